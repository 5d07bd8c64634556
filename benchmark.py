"""Run SmolVLM on POPE and score it under the official, lmms-eval and VLMEvalKit conventions.

    python benchmark.py --benchmark-file samples/pope --image-root coco/val2014   # scripts/get_coco_val2014.py
    python benchmark.py --benchmark-file samples/pope/pope_subset_random.json --image-root samples/coco_val2014
    python benchmark.py --answers benchmark_output/answers.jsonl        # re-score, no model
    python benchmark.py --benchmark-file ... --ablate-heads 12:3,14:7 --control random   # arms

Writes answers.jsonl (one row per question, appended as it goes: a rerun resumes), results.json and
results.md to --output-dir and prints the table; a folder holding anything else is refused, untouched.
With --ablate-heads, one such folder per arm under OUTPUT_DIR/arms/ (base, ablated, control-N) and the
arms side by side in OUTPUT_DIR/results.{json,md}.
Details: docs/pope.md.
"""
import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path

from smolattn import engine
from smolattn import extract as ex
from smolattn import methods as mth
from smolattn import model as mdl
from smolattn import pope
from smolattn import pope_arms
from smolattn import pope_runner as pr
from smolattn import runmeta
from smolattn.scheduler import run_engine
from smolattn.errors import UserError, run_cli


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark-file", nargs="+", metavar="PATH",
                    help="POPE JSON-lines file(s) (question_id, image, text, label), or a folder holding "
                         "coco_pope_{random,popular,adversarial}.json")
    ap.add_argument("--image-root", default="coco/val2014",
                    help="folder of the COCO val2014 images (scripts/get_coco_val2014.py puts them here)")
    ap.add_argument("--output-dir", default="benchmark_output")
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions, in file order (0: all)")
    mdl.add_model_arguments(ap)
    ap.add_argument("--longest-edge", type=int, default=None, help="processor resize of the longest edge "
                    "(default: the checkpoint's own, 2048 for SmolVLM-256M: up to 4x4 tiles + global; "
                    "512: global tile only, ~10x faster)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images whose questions are answered in one generate call (default: 8 on a GPU, 1 on CPU)")
    ap.add_argument("--prompt-suffix", default=pope.DEFAULT_SUFFIX,
                    help="appended to each question; default lmms-eval's %(default)r, so a 256M model answers "
                         "with one word (VLMEvalKit adds none: pass '' to match it)")
    ap.add_argument("--max-new-tokens", type=int, default=runmeta.POPE_MAX_NEW_TOKENS,
                    help="greedy answer length cap; 'Yes'/'No' take 1-2 tokens, all three parsers look at the start")
    ap.add_argument("--answers", metavar="FILE", help="re-score a saved answers.jsonl; loads no model")
    ap.add_argument("--overwrite", action="store_true", help="discard answers made with another configuration")
    ap.add_argument("--naive", action="store_true", help="encode the image again for every question (slow; for checks)")
    ap.add_argument("--attention", action="store_true",
                    help="also store each question's object-word attention run under OUTPUT_DIR/attention/")
    ap.add_argument("--methods", default=mth.RAW, help=f"with --attention: comma list of {', '.join(mth.names())} "
                    "stored in each attention run (default raw; see docs/run-format.md)")
    ap.add_argument("--annotations", metavar="COCO_JSON",
                    help="COCO instances JSON: score how well the attention localises the object (needs --attention)")
    ap.add_argument("--ablate-heads", metavar="SPEC", default=None,
                    help="also score with these heads ablated: 12:3,14:7 | 12:* | top:N (with --analysis); 0-based; "
                         "each arm (base, ablated, controls) in OUTPUT_DIR/arms/ (docs/pope.md)")
    ap.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                    help="with --ablate-heads: zero the heads' output or replace it by its mean over the prompt")
    ap.add_argument("--analysis", default=None, help="head analysis folder (analyze_heads.py) for --ablate-heads top:N")
    ap.add_argument("--control", choices=pope_arms.CONTROLS, default=None,
                    help="with --ablate-heads: also score with as many random heads (not the ablated ones) ablated")
    ap.add_argument("--control-draws", type=int, default=None, help="random head sets of --control (default 3)")
    ap.add_argument("--control-seed", type=int, default=None, help="seed of the --control draws (default 0)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per Ray actor (= torch threads on CPU)")
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    args = ap.parse_args(argv)
    if args.engine == "local" and args.num_workers != 1:
        ap.error("--num-workers > 1 needs --engine ray (the local engine runs one worker)")
    if args.limit < 0 or args.max_new_tokens < 1 or (args.longest_edge or 1) < 1 or args.num_workers < 1 \
            or (args.batch_size or 1) < 1:
        ap.error("--limit must be >= 0; --max-new-tokens, --longest-edge, --batch-size and --num-workers >= 1")
    if args.annotations and not args.attention:
        ap.error("--annotations needs --attention")
    if args.methods != mth.RAW and not args.attention:
        ap.error("--methods needs --attention")
    if args.ablate_heads is None and (args.control or args.analysis or args.ablation != "zero"):
        ap.error("--ablation, --analysis and --control go with --ablate-heads")
    if args.control is None and (args.control_draws is not None or args.control_seed is not None):
        ap.error("--control-draws and --control-seed go with --control random")
    args.control_draws = 3 if args.control_draws is None else args.control_draws
    args.control_seed = 0 if args.control_seed is None else args.control_seed
    if args.control_draws < 1 or args.control_seed < 0:
        ap.error("--control-draws must be at least 1 and --control-seed at least 0")
    if args.ablate_heads is not None and (args.answers or args.attention):
        ap.error("--ablate-heads scores answers (not with --answers) and stores no attention runs (not with --attention)")
    if not args.answers and not args.benchmark_file:
        ap.error("--benchmark-file is required (e.g. samples/pope or samples/pope/coco_pope_popular.json), "
                 "unless --answers re-scores saved answers")
    return args


def load_questions(paths, limit):
    try:
        questions = pope.load_questions(paths)
        sources = pope.describe_sources(paths)
    except pope.PopeInputError as e:
        raise UserError(str(e))
    return questions[:limit] if limit else questions, sources


def finish(out_dir, rows, sources, config, expected=None) -> int:
    results, md = pope.report(rows, sources=sources, config=config, expected=expected)
    pope.write_report(out_dir, results, md)
    print(md)
    c = results["counts"]
    if c["errors"]:
        print(f"{c['errors']} questions failed ({c['images_missing']} images missing); see the error rows in "
              f"{Path(out_dir) / 'answers.jsonl'}", file=sys.stderr)
    return 1 if c["errors"] else 0


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.answers:   # re-score only
        sources = load_questions(args.benchmark_file, 0)[1] if args.benchmark_file else None
        pope.check_output(out)                  # never a file of the user's (one line, before anything)
        out.mkdir(parents=True, exist_ok=True)
        return finish(out, pope.read_answers(args.answers), sources, None)

    questions, sources = load_questions(args.benchmark_file, args.limit)
    methods = tuple(mth.parse(args.methods))
    boxes = pope.load_boxes(args.annotations) if args.annotations else None
    device = args.device or ("cuda" if args.engine == "ray" and args.gpus_per_worker else mdl.default_device())
    benchmark = {"benchmark_file": [os.path.abspath(p) for p in args.benchmark_file],
                 "image_root": os.path.abspath(args.image_root), "limit": args.limit,
                 "annotations": os.path.abspath(args.annotations) if args.annotations else None}
    cfg = pr.Config(mdl.resolve_model_id(args.model_id), args.revision, device,
                    args.dtype or mdl.default_dtype(device), args.prompt_suffix,
                    args.longest_edge, args.max_new_tokens, args.naive,
                    str(out / "attention") if args.attention else None,
                    args.batch_size or engine.default_batch_size(device), methods, benchmark=benchmark)
    ex.check_longest_edge(args.longest_edge, ex.checkpoint_tile_size(args.model_id, args.revision))
    arms = plan_arms(args, pope_arms.model_shape(cfg.model_id, cfg.revision))    # bad SPEC: before the model loads
    pope.check_output(out, [out / "attention" / q.split / str(q.question_id) for q in questions] if args.attention else ())
    # the configuration includes what only the loaded model knows (resolved revision, processor settings);
    # the local engine's worker reuses this copy, Ray's driver loads one on CPU only to learn it
    probe = pr.get_model(cfg) if args.engine == "local" else mdl.load(cfg.model_id, "cpu", cfg.dtype, cfg.revision)
    cfg = dataclasses.replace(cfg, info=runmeta.model_info(probe, cfg.longest_edge))
    text = probe.model.config.text_config
    arms = plan_arms(args, (text.num_hidden_layers, text.num_attention_heads))
    del probe
    config = lambda c: dict(c.fingerprint(), key=c.key(), device=c.device, naive=c.naive,  # noqa: E731
                            image_root=args.image_root, limit=args.limit)
    if arms is None:
        rows = answer(out, cfg, questions, args, boxes)
        return finish(out, rows, sources, config(cfg), expected=len(questions))
    return run_arms(out, cfg, arms, questions, sources, args, boxes, config)


def run_arms(out, cfg, arms, questions, sources, args, boxes, config) -> int:
    """--ablate-heads: each arm a POPE output folder of its own (OUT/arms/NAME, resumable on its own),
    then the arms side by side in OUT/results.{json,md}."""
    cfgs = [dataclasses.replace(cfg, heads=arm.heads, ablation=arm.ablation) for arm in arms]
    for arm, acfg in zip(arms, cfgs):          # before any arm runs
        path = out / pope_arms.ARMS_DIR / arm.name / "answers.jsonl"
        if not args.overwrite and pope_arms.holds_other(path, acfg.key()):
            raise UserError(f"{path} holds answers made with another configuration (arm {arm.name}: now heads "
                            f"{pope_arms.fmt_heads(arm.heads)}, {arm.ablation}, config {acfg.key()}); pass --overwrite "
                            "to redo the arms whose configuration changed, or another --output-dir")
    done, failed = [], 0
    for arm, acfg in zip(arms, cfgs):
        folder = out / pope_arms.ARMS_DIR / arm.name
        print(f"arm {arm.name}: " + (f"heads {pope_arms.fmt_heads(arm.heads)} ablated ({arm.ablation})" if arm.heads
                                     else "no head ablated"), file=sys.stderr)
        # --overwrite discards only the arms whose answers are another configuration's (a changed SPEC, draw)
        overwrite = args.overwrite and pope_arms.holds_other(folder / "answers.jsonl", acfg.key())
        rows = answer(folder, acfg, questions, args, boxes, desc=f"POPE {arm.name}", overwrite=overwrite)
        results, md = pope.report(rows, sources=sources, config=config(acfg), expected=len(questions))
        pope.write_report(folder, results, md)
        failed += results["counts"]["errors"]
        done.append((arm, results))
    control = {"kind": args.control, "draws": args.control_draws, "seed": args.control_seed} if args.control else None
    results, md = pope_arms.report(done, sources=sources, config=config(cfg), control=control)
    pope.write_report(out, results, md)
    print(md)
    if failed:
        print(f"{failed} questions failed over the arms; see the error rows in {out / pope_arms.ARMS_DIR}/*/answers.jsonl",
              file=sys.stderr)
    return 1 if failed else 0


def plan_arms(args, shape):
    """The arms of --ablate-heads (None without it); ``shape``: (layers, heads) of the model, or None when
    not known yet (before loading a model that is not on this machine)."""
    if args.ablate_heads is None or shape is None:
        return None
    return pope_arms.plan(args.ablate_heads, *shape, ablation=args.ablation, analysis=args.analysis,
                          control=args.control, draws=args.control_draws, seed=args.control_seed)


def answer(out, cfg, questions, args, boxes, desc="POPE", overwrite=None) -> list[dict]:
    """Answer the questions not answered yet in ``out``/answers.jsonl with ``cfg``; its rows of ``questions``."""
    overwrite = args.overwrite if overwrite is None else overwrite
    answers = pope.AnswersFile(out / "answers.jsonl", cfg.key(), overwrite)
    if overwrite:   # our attention runs of another configuration go too (nothing else under attention/)
        removed = pr.remove_other_runs(out / "attention", cfg.key())
        if removed:
            print(f"removed {removed} attention runs of another configuration", file=sys.stderr)
    done = answers.done()
    todo = [q for q in questions if q.key not in done]
    print(f"{len(questions)} questions ({len(questions) - len(todo)} already answered), "
          f"{len({q.image for q in todo})} images to run; config {cfg.key()}", file=sys.stderr)

    if todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="q", desc=desc, dynamic_ncols=True)

        def on_result(rows):   # the worker answers all questions of one image: a list of rows
            for row in rows:
                answers.append(row)
            bar.update(len(rows))

        try:
            run_engine(pr.make_items(todo, args.image_root, boxes, cfg.batch_size), functools.partial(pr.make_worker, cfg),
                       engine=args.engine, num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                       cpus_per_worker=args.cpus_per_worker,
                       ray_address=args.ray_address, prefetch=pr.prefetch, on_result=on_result,
                       on_failure=functools.partial(pr.failed_rows, cfg))
        finally:
            bar.close()
    answers.close()
    keys = {q.key for q in questions}
    return [r for r in answers.rows if (r["split"], r["question_id"]) in keys]


if __name__ == "__main__":
    run_cli(main)

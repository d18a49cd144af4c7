"""Loading pipelines from save_pretrained folders and the HF cache layout, offline, with clear errors."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen import TiltgenError  # noqa: E402
from tiltgen.backends.diffusers import DiffusersBackend, load_pipeline, resolve_model_path  # noqa: E402


def _latents(backend, seeds=(0,)):
    model = backend.at(16, 16)
    extra = {"max_sequence_length": 8} if backend.family == "flux" else {}
    cond = model.encode(["a cat"] * len(seeds), guidance_scale=2.0, **extra)
    return model.sample(cond, seeds=list(seeds), steps=2, decode=False).latents


@pytest.mark.parametrize("build", [tiny.tiny_sd, tiny.tiny_sdxl, tiny.tiny_sd3, tiny.tiny_flux],
                         ids=["sd", "sdxl", "sd3", "flux"])
def test_save_pretrained_folder_round_trip(tmp_path, build):
    pipe = build()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusersBackend.from_pretrained(str(tmp_path / "pipe"))
    assert type(loaded.pipe) is type(pipe)
    torch.testing.assert_close(_latents(loaded), _latents(DiffusersBackend(pipe)), atol=1e-5, rtol=1e-5)


def _fake_cache(tmp_path, repo_id="tiny-org/tiny-sd"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    tiny.tiny_sd().save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return cache, repo / "snapshots" / rev


def test_model_id_resolves_in_the_local_cache(tmp_path):
    cache, snapshot = _fake_cache(tmp_path)
    assert resolve_model_path("tiny-org/tiny-sd", cache_dir=cache) == snapshot
    backend = DiffusersBackend.from_pretrained("tiny-org/tiny-sd", cache_dir=str(cache), dtype=torch.float32)
    assert backend.family == "sd"


def test_model_id_not_in_cache_names_id_and_cache(tmp_path):
    cache, _ = _fake_cache(tmp_path)
    with pytest.raises(TiltgenError, match=r"'stabilityai/sdxl-turbo' is not in the local Hugging Face cache") as err:
        load_pipeline("stabilityai/sdxl-turbo", cache_dir=cache)
    assert str(cache) in str(err.value)


def test_missing_path_and_bad_folders(tmp_path):
    with pytest.raises(TiltgenError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TiltgenError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(TiltgenError, match="is a file"):
        load_pipeline(str(tmp_path / "file.safetensors"))


def test_incomplete_folder_names_the_missing_weights(tmp_path):
    tiny.tiny_sd().save_pretrained(tmp_path / "pipe")
    for f in (tmp_path / "pipe" / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(TiltgenError, match=r"missing component\(s\): unet/\*\.safetensors"):
        load_pipeline(tmp_path / "pipe")
    import shutil

    shutil.rmtree(tmp_path / "pipe" / "vae")
    with pytest.raises(TiltgenError, match=r"vae/ \(folder\)"):
        load_pipeline(tmp_path / "pipe")


def test_unsupported_pipeline_class(tmp_path):
    tiny.tiny_sd().save_pretrained(tmp_path / "pipe")
    index = tmp_path / "pipe" / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "WuerstchenPipeline"))
    with pytest.raises(TiltgenError, match="'WuerstchenPipeline' is not supported"):
        load_pipeline(tmp_path / "pipe")


def test_importing_tiltgen_does_not_import_diffusers():
    import subprocess
    import sys

    code = ("import sys, tiltgen, tiltgen.backends.diffusers, tiltgen.rewards; "
            "assert not any(m.split('.')[0] in ('diffusers', 'transformers') for m in sys.modules), 'eager import'")
    subprocess.run([sys.executable, "-c", code], check=True)

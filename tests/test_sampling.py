"""DDIM/PLMS with the shared reference stream, the ViCo loader's three formats, and sample.py."""
from __future__ import annotations

import errno
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sample
from ldm.data.images import load_image, to_tensor
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import (
    DDIMSchedule,
    GuidedDenoiser,
    SamplingReference,
    SamplingRun,
    encode_references,
    make_ddim_timesteps,
    make_sampling_reference,
    sample_prompt,
)
from ldm.models.loading import load_vico_model, read_vico_weights, save_adapter
from ldm.util import CheckpointError, instantiate_from_config, save_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "vico-tiny.yaml"
PHOTOS = [ROOT / "data" / "monster_toy" / "00.jpg", ROOT / "data" / "monster_toy" / "01.jpg"]
PROMPT = "a photo of * on the beach"
LATENT = (4, 16, 16)


def tiny_config(**unet_overrides):
    config = OmegaConf.load(TINY_CONFIG)
    for key, value in unet_overrides.items():
        config.model.params.unet_config.params[key] = value
    return config


def build_tiny(config, seed: int = 0):
    """Random tiny ViCo with non-zero output convs, so every path shows in the outputs."""
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj_out.weight", "out.2.weight", "out_layers.3.weight")):
                p.normal_(0, 0.05)
        model.embedding_manager.string_to_param_dict["*"].normal_(0, 1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(tiny_config())


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model's base weights and its trained weights in the three ViCo formats."""
    folder = tmp_path_factory.mktemp("vico")
    base = folder / "base.safetensors"
    save_state_dict(tiny.base_state_dict(), base)
    config = tiny_config()
    config.model.params.ckpt_path = str(base)
    training = folder / "last.ckpt"
    checkpoint = {"state_dict": tiny.trained_state_dict(), "config": OmegaConf.to_container(config), "global_step": 3}
    torch.save(checkpoint, training)
    adapter = folder / "adapter.safetensors"
    save_adapter(tiny, config, adapter)
    authors = folder / "authors"
    authors.mkdir()
    trained = tiny.trained_state_dict()
    image_attention = {k.removeprefix("model."): v for k, v in trained.items() if k.startswith("model.")}
    torch.save(image_attention, authors / "cross_attention-100.pt")
    tiny.embedding_manager.save_authors_format(authors / "embeddings_gs-100.pt")
    return {
        "base": base,
        "training": training,
        "adapter": adapter,
        "cross_attention": authors / "cross_attention-100.pt",
        "embeddings": authors / "embeddings_gs-100.pt",
        "folder": folder,
    }


def conditioning(model, prompt: str = PROMPT):
    tokens = model.tokenize([prompt])
    return tokens[0], model.get_learned_conditioning(tokens), model.get_learned_conditioning([""])


def references(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- schedule
def test_ddim_timesteps_follow_compvis():
    assert np.array_equal(make_ddim_timesteps(50, 1000), np.arange(1, 1000, 20))
    assert len(make_ddim_timesteps(7, 1000)) == 8  # CompVis's uniform schedule can overshoot
    with pytest.raises(ValueError, match="3 sampling steps do not fit"):
        make_ddim_timesteps(3, 1000)


def test_ddim_sigmas_follow_compvis(tiny):
    schedule = DDIMSchedule.from_model(tiny, 10, 0.5, torch.device("cpu"))
    a = tiny.alphas_cumprod.double()
    steps = torch.arange(1, 1000, 100)
    prev = torch.cat([a[:1], a[steps[:-1]]])
    sigmas = 0.5 * ((1 - prev) / (1 - a[steps]) * (1 - a[steps] / prev)).sqrt()
    torch.testing.assert_close(schedule.sigmas, sigmas.float())
    torch.testing.assert_close(schedule.alphas_prev, prev.float())


def test_ddim_and_plms_updates_match_the_formulas(tiny):
    """A stub denoiser with a known noise per timestep checks the update rules themselves."""
    schedule = DDIMSchedule.from_model(tiny, 10, 0.0, torch.device("cpu"))
    table = {
        int(t): torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(int(t))) for t in schedule.timesteps
    }

    def stub(x, t, records=None):
        return table[int(t)]

    def ddim(x, eps, index):
        a_t, a_prev = schedule.alphas[index], schedule.alphas_prev[index]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    x = torch.randn(1, *LATENT)
    x_prev, _ = DDIMSampler(tiny).update(x, 9, SamplingRun(schedule, stub, None), None)
    torch.testing.assert_close(x_prev, ddim(x, table[901], 9))

    plms, run = PLMSSampler(tiny), SamplingRun(schedule, stub, None)
    e = [table[int(schedule.timesteps[i])] for i in range(9, 4, -1)]
    expected_eps = [
        (e[0] + e[1]) / 2,
        (3 * e[1] - e[0]) / 2,
        (23 * e[2] - 16 * e[1] + 5 * e[0]) / 12,
        (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0]) / 24,
        (55 * e[4] - 59 * e[3] + 37 * e[2] - 9 * e[1]) / 24,
    ]
    for step, eps_prime in enumerate(expected_eps):
        x_next, _ = plms.update(x, 9 - step, run, None)
        torch.testing.assert_close(x_next, ddim(x, eps_prime, 9 - step))
        x = x_next
    assert len(run.previous_eps) == 3


# ----------------------------------------------------------- shared reference
@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("n_samples", [1, 4])
def test_shared_reference_equals_per_sample(tiny, n_samples, guided, n_refs):
    """One reference group per branch gives what one group per sample and branch gives."""
    tokens, c, uc = conditioning(tiny)
    refs = references(n_refs)
    x = torch.randn(n_samples, *LATENT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(601)
    with torch.no_grad():
        denoiser = GuidedDenoiser(tiny, c, n_samples, 7.5 if guided else 1.0, uc, SamplingReference(refs, tokens))
        shared = denoiser.model_output(x, t)

        context = torch.cat(([uc.expand(n_samples, -1, -1)] if guided else []) + [c.expand(n_samples, -1, -1)])
        rows = context.shape[0] * n_refs
        naive_reference = tiny.reference_condition(
            refs.repeat(context.shape[0], 1, 1, 1),
            context.repeat_interleave(n_refs, 0),
            tokens.expand(rows, -1),  # the prompt's placeholder selects the mask in both branches
            timesteps=t.expand(rows),
            references_per_group=n_refs,
        )
        x_in, t_in = torch.cat([x] * (2 if guided else 1)), t.expand(context.shape[0])
        naive = tiny.apply_model(x_in, t_in, context, naive_reference)
        plain = tiny.apply_model(x_in, t_in, context)
    assert shared.dtype == torch.float32 and shared.shape == naive.shape
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=0)
    assert (shared - plain).abs().max() > 1e-3  # the reference does change the prediction


def test_prompt_without_placeholder_warns_once_per_call(tiny, caplog):
    tokens, c, uc = conditioning(tiny, "a photo of a toy")
    with caplog.at_level(logging.WARNING, logger="ldm.models.diffusion.sampling"):
        DDIMSampler(tiny).sample(
            4, 1, LATENT, c, SamplingReference(references(1), tokens), 7.5, uc,
            generator=torch.Generator().manual_seed(0), verbose=False,
        )  # fmt: skip
    warnings = [r for r in caplog.records if "no placeholder" in r.getMessage()]
    assert len(warnings) == 1


def test_attention_records_of_chosen_steps(tiny):
    _, c, uc = conditioning(tiny)
    photos = to_tensor(np.stack([load_image(p, 64) for p in PHOTOS]))
    reference = make_sampling_reference(tiny, photos, PROMPT)
    assert reference.latents.shape == (2, *LATENT)
    _, intermediates = DDIMSampler(tiny).sample(
        4, 2, LATENT, c, reference, 7.5, uc,
        generator=torch.Generator().manual_seed(0), verbose=False, record_attention=[0, 3],
    )  # fmt: skip
    assert sorted(intermediates["attention"]) == [0, 3]
    records = intermediates["attention"][3]
    assert [r.layer for r in records] == [4, 6]
    for record in records:  # the conditional branch only: one row per reference
        assert record.placeholder_map.shape == (2, record.height * record.width)
        assert record.mask.shape == record.placeholder_map.shape and record.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="outside 0..3"):
        DDIMSampler(tiny).sample(4, 1, LATENT, c, record_attention=[4], verbose=False)


# ------------------------------------------------------------ reproducibility
def test_ddim_with_eta_is_reproducible_with_the_generator(tiny):
    tokens, c, uc = conditioning(tiny)
    reference = SamplingReference(references(1), tokens)

    def run(seed: int) -> torch.Tensor:
        samples, _ = DDIMSampler(tiny).sample(
            4, 2, LATENT, c, reference, 3.0, uc, eta=0.8, generator=torch.Generator().manual_seed(seed), verbose=False
        )
        return samples

    first = run(5)
    assert torch.equal(first, run(5))
    assert not torch.allclose(first, run(6))
    x_T = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(5))
    eta0 = DDIMSampler(tiny).sample(4, 2, LATENT, c, reference, 3.0, uc, x_T=x_T, verbose=False)[0]
    assert not torch.allclose(first, eta0)  # eta adds noise beyond the shared x_T


def test_plms_runs_and_refuses_eta(tiny):
    tokens, c, uc = conditioning(tiny)
    reference = SamplingReference(references(2), tokens)
    generator = torch.Generator().manual_seed(0)
    samples, intermediates = PLMSSampler(tiny).sample(
        5, 2, LATENT, c, reference, 7.5, uc, generator=generator, verbose=False
    )
    assert samples.shape == (2, *LATENT) and torch.isfinite(samples).all()
    assert len(intermediates["pred_x0"]) == 3
    with pytest.raises(ValueError, match="eta must be 0 for PLMS"):
        PLMSSampler(tiny).sample(5, 1, LATENT, c, eta=0.5, verbose=False)


# ----------------------------------------------------------------- loading
def outputs(model) -> torch.Tensor:
    tokens, c, uc = conditioning(model)
    denoiser = GuidedDenoiser(model, c, 2, 7.5, uc, SamplingReference(references(2), tokens))
    with torch.no_grad():
        return denoiser(torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(9)), torch.tensor(401))


@pytest.mark.parametrize("fmt", ["training", "adapter", "cross_attention", "embeddings", "pair"])
def test_each_format_loads_the_trained_model(tiny, files, fmt):
    expected = outputs(tiny)
    kwargs = {}
    ckpt = files[fmt] if fmt != "pair" else [files["embeddings"], files["cross_attention"]]
    if fmt in ("cross_attention", "embeddings", "pair"):  # no stored config: vico.yaml unless told
        kwargs = {"config": TINY_CONFIG, "base_ckpt": files["base"]}
    model, config = load_vico_model(ckpt, **kwargs)
    assert config.model.params.unet_config.params.model_channels == 32
    assert not model.training
    for key, value in tiny.trained_state_dict().items():
        assert torch.equal(model.trained_state_dict()[key], value), key
    torch.testing.assert_close(outputs(model), expected, atol=1e-6, rtol=0)


def test_authors_pair_defaults_to_the_sd_config(files):
    weights = read_vico_weights(files["cross_attention"])
    assert weights.config is None
    assert "embedding_manager.string_to_param_dict.*" in weights.state_dict
    assert all(k.startswith(("model.diffusion_model.", "embedding_manager.")) for k in weights.state_dict)


def test_save_adapter_is_atomic_and_overwrites(tiny, files, tmp_path):
    path = tmp_path / "export" / "adapter.safetensors"
    save_adapter(tiny, OmegaConf.to_container(tiny_config()), path)
    save_adapter(tiny, tiny_config(), path)
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]
    weights = read_vico_weights(path)
    assert weights.config.model.params.unet_config.params.model_channels == 32
    assert set(weights.state_dict) == set(tiny.trained_state_dict())


@pytest.fixture(scope="module")
def bad_files(files):
    """Files a user might wrongly pass: garbage, a base checkpoint, an adapter of another model."""
    folder = files["folder"]
    garbage = folder / "garbage.ckpt"
    garbage.write_bytes(b"this is no checkpoint")
    base_as_ckpt = folder / "base.ckpt"
    save_state_dict({"model.diffusion_model.out.2.weight": torch.zeros(1)}, base_as_ckpt)
    other = build_tiny(tiny_config(model_channels=64), seed=1)
    config = tiny_config()
    config.model.params.ckpt_path = str(files["base"])
    other_adapter = folder / "other.safetensors"
    save_adapter(other, config, other_adapter)
    no_base = folder / "no_base.ckpt"
    trained = read_vico_weights(files["training"]).state_dict
    torch.save({"state_dict": trained, "config": OmegaConf.to_container(tiny_config())}, no_base)
    return {"garbage": garbage, "base_as_ckpt": base_as_ckpt, "other_adapter": other_adapter, "no_base": no_base}


def test_loader_errors_are_one_line_and_name_the_file(files, bad_files, tmp_path):
    cases = [
        ((tmp_path / "missing.ckpt",), {}, CheckpointError, "checkpoint not found"),
        ((bad_files["garbage"],), {}, CheckpointError, "garbage.ckpt"),
        ((bad_files["base_as_ckpt"],), {}, CheckpointError, "holds no ViCo weights"),
        ((files["base"],), {}, CheckpointError, "not a ViCo adapter"),
        ((bad_files["no_base"],), {}, ValueError, "names no base Stable Diffusion checkpoint"),
        ((files["training"],), {"base_ckpt": tmp_path / "nope.ckpt"}, CheckpointError, "base checkpoint not found"),
        ((bad_files["other_adapter"],), {}, CheckpointError, "is this a checkpoint of another base model"),
        ((files["training"],), {"config": tmp_path / "nope.yaml"}, ValueError, "config not found"),
    ]
    for args, kwargs, error, fragment in cases:
        with pytest.raises(error) as caught:
            load_vico_model(*args, **kwargs)
        message = str(caught.value)
        assert fragment in message and "\n" not in message, message
    lone = files["folder"] / "lonely" / "cross_attention-7.pt"
    lone.parent.mkdir()
    lone.write_bytes(files["cross_attention"].read_bytes())
    with pytest.raises(CheckpointError, match=r"embeddings_gs-7\.pt, is not in"):
        load_vico_model(lone)


# ---------------------------------------------------------------- sample.py
def cli(files, outdir: Path, *extra: str, ckpt: str = "training") -> list[str]:
    return [
        "--ckpt", str(files[ckpt]), "--ref", str(PHOTOS[0]), "--prompt", PROMPT, "--outdir", str(outdir),
        "--n_samples", "2", "--ddim_steps", "2", "--device", "cpu", *extra,
    ]  # fmt: skip


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.mark.parametrize("fmt", ["training", "adapter", "cross_attention"])
def test_cli_writes_samples_and_grid(files, tmp_path, fmt, capsys):
    extra = ["--config", str(TINY_CONFIG), "--base_ckpt", str(files["base"])] if fmt == "cross_attention" else []
    assert sample.main(cli(files, tmp_path, "--n_iter", "2", *extra, ckpt=fmt)) == 0
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert read_png(tmp_path / "samples" / "00000.png").shape == (64, 64, 3)
    grid = read_png(tmp_path / "grid-a-photo-of-s-on-the-beach.png")
    assert grid.shape == (2 + 2 * 66, 2 + 3 * 66, 3)  # 2 iterations x (reference + 2 samples)
    reference = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(grid[2:66, 2:66].astype(int) - reference).mean() < 3  # the squashed reference at the top left
    assert "error" not in capsys.readouterr().err


def test_cli_is_reproducible(files, tmp_path):
    args = ("--ddim_eta", "0.5", "--seed", "7")
    assert sample.main(cli(files, tmp_path / "a", *args)) == 0
    assert sample.main(cli(files, tmp_path / "b", *args)) == 0
    assert sample.main(cli(files, tmp_path / "c", "--ddim_eta", "0.5", "--seed", "8")) == 0
    for name in ("00000.png", "00001.png"):
        first = read_png(tmp_path / "a" / "samples" / name)
        assert np.array_equal(first, read_png(tmp_path / "b" / "samples" / name))
        assert not np.array_equal(first, read_png(tmp_path / "c" / "samples" / name))


def test_cli_plms_several_prompts_references_and_attention(files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of * on the beach\n\na * toy in the snow\n")
    argv = cli(files, tmp_path / "out", "--plms", "--save_attention", "--ddim_steps", "4")
    argv[argv.index("--prompt") : argv.index("--prompt") + 2] = ["--from_file", str(prompts)]
    argv[argv.index("--ref") + 1 : argv.index("--ref") + 2] = [str(p) for p in PHOTOS]
    assert sample.main(argv) == 0
    out = tmp_path / "out"
    assert len(list((out / "samples").iterdir())) == 4
    assert (out / "grid-a-photo-of-s-on-the-beach.png").is_file() and (out / "grid-a-s-toy-in-the-snow.png").is_file()
    pictures = sorted((out / "attention").iterdir())
    assert len(pictures) == 2 * 4  # 4 steps drawn per prompt
    assert pictures[0].name == "a-photo-of-s-on-the-beach-step000-t0751.png"
    picture = read_png(pictures[0])
    assert picture.shape[1] == 2 + 5 * 66  # reference + (map, mask) for each of the 2 patched layers
    assert picture.shape[0] == 14 + 2 + 2 * 66  # header + one row per reference


def bad_input_cases(files, bad_files, tmp_path):
    undecodable = tmp_path / "broken.jpg"
    undecodable.write_bytes(b"not an image")
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(bytes(range(256)) * 8)
    two_negatives = tmp_path / "prompts.txt"
    two_negatives.write_text("a * | blurry | dark\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    tiny = ["--config", str(TINY_CONFIG)]
    return {
        "missing ref": (["--ref", str(tmp_path / "nope.jpg")], "image not found"),
        "undecodable ref": (["--ref", str(undecodable)], "cannot read image"),
        "H not divisible": (["--H", "66"], "--H 66 is not a positive multiple of the autoencoder factor 4"),
        "missing ckpt": (["--ckpt", str(tmp_path / "nope.ckpt")], "checkpoint not found"),
        "other base model": (["--ckpt", str(bad_files["other_adapter"])], "is this a checkpoint of another base model"),
        "missing base": (["--base_ckpt", str(tmp_path / "sd.ckpt")], "base checkpoint not found"),
        "no base": (["--ckpt", str(files["cross_attention"]), *tiny], "pass --base_ckpt"),
        "autocast on cpu": (["--precision", "autocast"], "autocast needs a CUDA device"),
        "nan scale": (["--scale", "nan"], "--scale must be a finite number, got nan"),
        "infinite scale": (["--scale", "inf"], "--scale must be a finite number, got inf"),
        "nan eta": (["--ddim_eta", "nan"], "--ddim_eta must be a finite number >= 0"),
        "plms and sampler": (["--plms", "--sampler", "euler_a"], "--plms and --sampler euler_a contradict"),
        "eta of a deterministic sampler": (["--sampler", "dpmpp_2m", "--ddim_eta", "0.5"], "dpmpp_2m is deterministic"),
        "karras for ddim": (["--spacing", "karras"], "--spacing karras is for --sampler dpmpp_2m or euler_a"),
        "directory as ckpt": (["--ckpt", str(tmp_path)], "is a directory, not a checkpoint file"),
        "random bytes": (["--ckpt", str(random_bytes)], "not a checkpoint (neither"),
        "two separators": (["--from_file", str(two_negatives)], "has more than one '|'"),
        "outdir under a file": (["--outdir", str(a_file / "out")], "a-file is a file, not a folder"),
        "H below the UNet's downsampling": (["--H", "4"], "--H 4: this model samples sizes that are multiples of 8"),
        "W off the UNet's downsampling": (["--W", "12"], "--W 12: this model samples sizes that are multiples of 8"),
        "H too large": (["--H", "400000"], "multiples of 8 (the autoencoder factor 4 times the UNet's downsampling), up to 8192"),
        "seed beyond torch's": (["--seed", str(2**70)], f"--seed {2**70}: the seeds of this run"),
        "last seed beyond torch's": (["--seed", str(2**64 - 1)], f"({2**64 - 1} to {2**64}) must lie between"),
        "reference seed beyond torch's": (["--reference_seed", str(-(2**70))], "--reference_seed"),
        "meta device": (["--device", "meta"], "--device meta: models run on cpu, cuda or mps, not meta"),
        "xpu device": (["--device", "xpu"], "--device xpu: models run on cpu, cuda or mps, not xpu"),
    }


def with_arguments(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with each ``--flag value`` of ``extra`` replacing that flag's value or appended;
    a flag not followed by a value is a switch; ``--from_file`` replaces ``--prompt``."""
    argv = list(argv)
    if "--from_file" in extra:
        del argv[argv.index("--prompt") : argv.index("--prompt") + 2]
    i = 0
    while i < len(extra):
        flag = extra[i]
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            if flag in argv:
                argv[argv.index(flag) + 1] = extra[i + 1]
            else:
                argv += [flag, extra[i + 1]]
            i += 2
        else:
            argv.append(flag)
            i += 1
    return argv


def test_cli_bad_inputs_exit_2_with_one_line(files, bad_files, tmp_path, capsys):
    for name, (extra, fragment) in bad_input_cases(files, bad_files, tmp_path).items():
        argv = with_arguments(cli(files, tmp_path / "out", ckpt="training"), extra)
        assert sample.main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, (name, err)
    assert not (tmp_path / "out" / "samples").exists()


def test_cli_error_as_a_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "sample.py"),
            "--ckpt", str(tmp_path / "nope.ckpt"), "--ref", str(PHOTOS[0]), "--prompt", PROMPT,
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=600,  # a shared, loaded machine: the message is tested, not the speed
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: checkpoint not found: {tmp_path / 'nope.ckpt'}"]


# ------------------------------------------------- outputs, seeds, metadata
def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def test_cli_never_overwrites_samples_or_grids(files, tmp_path):
    out = tmp_path / "out"
    assert sample.main(cli(files, out)) == 0
    grid = out / "grid-a-photo-of-s-on-the-beach.png"
    kept_sample, kept_grid = (out / "samples" / "00001.png").read_bytes(), grid.read_bytes()
    (out / "samples" / "00000.png").unlink()
    assert sample.main(cli(files, out, "--seed", "43")) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00001.png", "00002.png", "00003.png"]
    assert (out / "samples" / "00001.png").read_bytes() == kept_sample  # numbered after the highest, not by count
    assert grid.read_bytes() == kept_grid
    assert png_text(out / "grid-a-photo-of-s-on-the-beach-2.png")["seeds"] == "43-44"


def test_png_metadata_regenerates_one_image_alone(files, tmp_path):
    argv = cli(files, tmp_path / "batch", "--n_iter", "2", "--ddim_eta", "0.5", "--seed", "7", "--negative_prompt", "blurry")
    assert sample.main(argv) == 0
    image = tmp_path / "batch" / "samples" / "00003.png"  # iteration 1, sample 1
    text = png_text(image)
    assert text["prompt"] == PROMPT and text["negative_prompt"] == "blurry"
    assert (text["seed"], text["reference_seed"]) == ("10", "9")  # seed + 3; reference seed + 1 * n_samples
    assert (text["sampler"], text["steps"], text["scale"], text["eta"]) == ("ddim", "2", "7.5", "0.5")
    assert json.loads(text["references"]) == [str(PHOTOS[0])]
    assert json.loads(text["checkpoint"]) == [str(files["training"])]
    assert (text["reference_resize"], text["reference_latent"]) == ("squash", "sample")
    again = tmp_path / "again"
    assert sample.main([*shlex.split(text["regenerate"]), "--outdir", str(again), "--device", "cpu"]) == 0
    (alone,) = (again / "samples").iterdir()
    difference = np.abs(read_png(alone).astype(int) - read_png(image).astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())
    other = read_png(tmp_path / "batch" / "samples" / "00002.png").astype(int)
    assert np.abs(other - read_png(image).astype(int)).mean() > 1  # a neighbour is another image


def test_negative_prompts_per_line_of_a_prompt_file(files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} | blurry, dark\n{PROMPT}\n")
    argv = with_arguments(cli(files, tmp_path / "out"), ["--from_file", str(prompts), "--negative_prompt", "noise"])
    assert sample.main(argv) == 0
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert [png_text(p)["negative_prompt"] for p in samples] == ["blurry, dark", "blurry, dark", "noise", "noise"]
    assert not np.array_equal(read_png(samples[0]), read_png(samples[2]))  # same prompt and seed, other negative


@pytest.mark.parametrize("extra", [["--sampler", "dpmpp_2m", "--spacing", "karras"], ["--sampler", "euler_a"]])
def test_cli_sigma_samplers(files, tmp_path, extra):
    assert sample.main(cli(files, tmp_path, "--ddim_steps", "3", "--save_attention", *extra)) == 0
    samples = sorted((tmp_path / "samples").iterdir())
    assert len(samples) == 2
    text = png_text(samples[0])
    assert text["sampler"] == extra[1] and text["spacing"] == (extra[3] if len(extra) > 2 else "uniform")
    assert text["eta"] == ("1.0" if extra[1] == "euler_a" else "0.0")
    assert len(list((tmp_path / "attention").iterdir())) == 3
    assert (tmp_path / "attention" / "a-photo-of-s-on-the-beach-step000-t0999.png").is_file()


def test_prompt_without_placeholder_warns_before_building(files, tmp_path, caplog):
    args = sample.build_parser().parse_args(with_arguments(cli(files, tmp_path), ["--prompt", "a photo of a toy"]))
    with caplog.at_level(logging.WARNING, logger="sample"):
        sample.prepare(args)
    assert any("'a photo of a toy' has no placeholder ('*')" in r.getMessage() for r in caplog.records)


def test_reference_resize_modes(files, tmp_path):
    wide = tmp_path / "wide.png"
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :32] = 255  # a white band at the left that a centre crop cuts away
    Image.fromarray(pixels).save(wide)
    references = {}
    for mode in ("squash", "crop"):
        argv = with_arguments(cli(files, tmp_path), ["--ref", str(wide), "--ref_resize", mode])
        references[mode] = sample.prepare(sample.build_parser().parse_args(argv)).references[0]
    squashed = np.asarray(Image.open(wide).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(references["squash"], squashed)
    assert references["squash"][:, :12].min() == 255 and references["crop"][:, :12].max() == 0


def test_reference_latents_sample_or_mode(tiny):
    images = to_tensor(np.stack([load_image(PHOTOS[0], 64)]))
    posterior = tiny.encode_first_stage(images.to(tiny.device))
    mode = encode_references(tiny, images)
    torch.testing.assert_close(mode, tiny.scale_factor * posterior.mode())
    first = encode_references(tiny, images, "sample", torch.Generator().manual_seed(1))
    assert torch.equal(first, encode_references(tiny, images, "sample", torch.Generator().manual_seed(1)))
    assert not torch.equal(first, encode_references(tiny, images, "sample", torch.Generator().manual_seed(2)))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, tiny.scale_factor * (posterior.mean + posterior.std * noise))
    with pytest.raises(ValueError, match="posterior must be one of"):
        encode_references(tiny, images, "median")


def test_sampled_images_are_clamped_to_the_image_range(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "decode_first_stage", lambda z: torch.linspace(-5, 5, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8))
    decoded, _ = sample_prompt(
        tiny, DDIMSampler(tiny), PROMPT, references(1), 2, LATENT, 2, 7.5, torch.Generator().manual_seed(0)
    )
    assert decoded.min() == -1 and decoded.max() == 1


def test_png_metadata_keeps_paths_as_typed():
    """Paths go into the PNG chunks exactly as the user typed them: a relative path stays relative
    (so ``regenerate`` works again from the same folder and names no folder of this machine), an
    absolute one stays absolute (README: type relative paths for pictures you share)."""
    args = sample.build_parser().parse_args(
        ["--ckpt", "logs/run/checkpoints/last.ckpt", "--ref", "photos/00.jpg", "--ref", "/abs/01.jpg", "--prompt", PROMPT]
    )
    job = SimpleNamespace(sampler="ddim", width=64, height=64, config=OmegaConf.create({}))
    text = sample.image_metadata(args, job, sample.Prompt(PROMPT), seed=3, reference_seed=3, eta=0.0)
    assert json.loads(text["checkpoint"]) == ["logs/run/checkpoints/last.ckpt"]
    assert json.loads(text["references"]) == ["photos/00.jpg", "/abs/01.jpg"]
    regenerate = shlex.split(text["regenerate"])
    assert regenerate[regenerate.index("--ckpt") + 1] == "logs/run/checkpoints/last.ckpt"
    assert regenerate[regenerate.index("--ref") + 1 : regenerate.index("--ref") + 3] == ["photos/00.jpg", "/abs/01.jpg"]
    assert str(Path.cwd()) not in "".join(text.values())


def test_a_full_disk_while_sampling_is_one_line(files, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample, "save_png", full)
    assert sample.main(cli(files, tmp_path / "out")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"error: cannot write to --outdir {tmp_path / 'out'}: No space left on device"]

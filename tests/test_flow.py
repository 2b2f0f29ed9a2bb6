"""Flow-matching backbones (SD3 / SD3.5, Flux.1): the noising and its sigma draws by hand, the
family adapters against the diffusers pipelines' own prompt encoding and packing, and
train.py end to end on tiny SD3.5- and Flux-shaped models (full, LoRA, cached, resumed)."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

import generate as generate_cli
from diffusion.denoising import draw_groups, group_generator, noisy_inputs_and_target
from diffusion.flow_matching import FlowMatching, resolution_shift, sample_u, shifted
from losses import get_spec
from models import generation
from models.flow_families import (
    FLUX_DEFAULT_GUIDANCE,
    FluxFamily,
    SD3Family,
    image_ids,
    pack_latents,
    unpack_latents,
)
from models.loading import load_components
from models.pipeline import load_pipeline
from tests.support import reset_accelerate
from tests.test_train import run
from training.config import TrainConfig, parse_config

FAMILIES = {"sd3": (SD3Transformer2DModel, StableDiffusion3Pipeline),
            "flux": (FluxTransformer2DModel, FluxPipeline)}  # fmt: skip


def process(**kwargs) -> FlowMatching:
    return FlowMatching(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), **kwargs)


# ---------------------------------------------------------------- noising and sigma draws


def test_noising_and_target_by_hand():
    x0 = torch.tensor([[[[2.0, -4.0]]], [[[1.0, 0.0]]]])  # [2, 1, 1, 2]
    eps = torch.tensor([[[[-1.0, 8.0]]], [[[3.0, 2.0]]]])
    t = torch.tensor([250.0, 1000.0])  # sigma 0.25 and 1 (pure noise)
    noisy, target = noisy_inputs_and_target(process(), x0, eps, t)
    # 0.75 * 2 + 0.25 * -1 = 1.25; 0.75 * -4 + 0.25 * 8 = -1; sigma 1: eps itself.
    assert noisy.tolist() == [[[[1.25, -1.0]]], [[[3.0, 2.0]]]]
    assert target.tolist() == [[[[-3.0, 12.0]]], [[[2.0, 2.0]]]]  # v = eps - x0
    assert noisy.dtype == target.dtype == torch.float32
    half = noisy_inputs_and_target(process(), x0.half(), eps.half(), t)[0]
    assert half.dtype == torch.float32  # computed in fp32 whatever the latents' dtype


def test_shift_by_hand():
    assert shifted(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2
    assert shifted(torch.tensor([0.2]), 1.0).item() == pytest.approx(0.2)
    static = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert resolution_shift(static, 4096) == 3.0
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    assert resolution_shift(dynamic, 256) == pytest.approx(math.exp(0.5))  # base_shift
    assert resolution_shift(dynamic, 4096) == pytest.approx(math.exp(1.15))  # max_shift
    # The exponential time shift the Flux pipeline samples with is the same map.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[0.3, 0.6], mu=0.8)
    expected = shifted(torch.tensor([0.3, 0.6]), math.exp(0.8))
    torch.testing.assert_close(sched.sigmas[:2], expected)


def test_logit_normal_moments():
    gen = torch.Generator().manual_seed(0)
    u = torch.cat([sample_u("logit_normal", gen, 0.5, 0.8, 1.29) for _ in range(20000)])
    logit = torch.log(u / (1 - u))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.025)  # 0.8 / sqrt(20000) = 0.006
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)


def test_uniform_and_mode_by_hand():
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(1, generator=torch.Generator().manual_seed(3)).item()
    assert sample_u("uniform", gen, 0, 1, 0).item() == u
    # mode with s = 0 is 1 - u; with s: 1 - u - s (cos^2(pi u / 2) - 1 + u)
    s = 1.29
    expected = 1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
    drawn = sample_u("mode", torch.Generator().manual_seed(3), 0, 1, s).item()
    assert drawn == pytest.approx(expected, rel=1e-6)


def test_a_pair_shares_sigma_and_noise_and_draws_do_not_depend_on_batching():
    flow = process(sampling="logit_normal", shift=3.0)
    draws = draw_groups((16, 4, 4), 2, 5, 3, flow.draw_timestep, seed=7)
    assert draws.timesteps.dtype == torch.float32
    assert torch.equal(draws.timesteps[:3], draws.timesteps[3:])  # chosen and rejected
    assert torch.equal(draws.noise[:3], draws.noise[3:])
    assert not torch.equal(draws.latent_eps[:3], draws.latent_eps[3:])  # one per image
    assert ((draws.timesteps > 0) & (draws.timesteps < 1000)).all()
    assert len(set(draws.timesteps[:3].tolist())) == 3
    # Group 6 alone (another process, a resumed run) draws what it drew among groups 5..7.
    alone = draw_groups((16, 4, 4), 2, 6, 1, flow.draw_timestep, seed=7)
    assert torch.equal(alone.timesteps, draws.timesteps[[1, 4]])
    assert torch.equal(alone.noise[0], draws.noise[1])
    # sigma is the group generator's first draw after the VAE sample noise, then shifted.
    gen = group_generator(7, 6)
    torch.randn((2, 16, 4, 4), generator=gen)
    u = torch.sigmoid(torch.randn(1, generator=gen))
    assert alone.timesteps[0].item() == pytest.approx(shifted(u, 3.0).item() * 1000, rel=1e-6)


# ---------------------------------------------------------------- family adapters

UNREAD = ("--data", "unread")  # a config names its data; loading models reads none


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    config = parse_config(["--pretrained_model", str(tiny_sd3_dir), "--resolution", "64", *UNREAD])
    return load_components(config, False, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def flux(tiny_flux_dir):
    config = parse_config(["--pretrained_model", str(tiny_flux_dir), "--resolution", "64", *UNREAD])
    return load_components(config, False, torch.float32, torch.device("cpu"))


def test_families_chosen_from_the_transformer_config(sd3, flux):
    assert isinstance(sd3.family, SD3Family) and isinstance(flux.family, FluxFamily)
    assert isinstance(sd3.noise_scheduler, FlowMatching)
    assert sd3.noise_scheduler.shift == 3.0  # SD3.5's static shift
    # Flux.1-dev's dynamic shift at 64 px: 16 image tokens, below base_image_seq_len.
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    assert flux.noise_scheduler.shift == pytest.approx(math.exp(mu))
    assert flux.family.guidance == 3.5  # guidance-distilled: the embedding gets a value


def test_a_resolution_the_patches_do_not_divide_is_refused(tiny_flux_dir):
    from common.cli import UsageError

    config = parse_config(["--pretrained_model", str(tiny_flux_dir), "--resolution", "72", *UNREAD])
    with pytest.raises(UsageError, match="multiple of 16"):
        load_components(config, False, torch.float32, torch.device("cpu"))


def test_the_resolution_check_reads_the_loaded_vae_and_transformer(tiny_sd3_dir, tmp_path):
    """After the models load: the tiny SD3's VAE downsamples 8x and its transformer takes 2x2
    patches, so 40 px (5 x 5 latents) is refused in one line; with a VAE of one level fewer
    (4x) 40 px is 10 x 10 latents of whole patches, and loads and runs."""
    import shutil

    from diffusers import AutoencoderKL

    from common.cli import UsageError

    config = parse_config(["--pretrained_model", str(tiny_sd3_dir), "--resolution", "40", *UNREAD])
    with pytest.raises(UsageError, match=r"^--resolution 40: sd3 needs a multiple of 16 \(the "
                       r"VAE downsamples 8x, the transformer takes 2x2 latent patches\); try "
                       r"--resolution 32$"):  # fmt: skip
        load_components(config, False, torch.float32, torch.device("cpu"))
    variant = tmp_path / "sd3-vae-4x"
    shutil.copytree(tiny_sd3_dir, variant)
    vae = dict(AutoencoderKL.load_config(tiny_sd3_dir, subfolder="vae"))
    fewer = {k: vae[k][:-1] for k in ("block_out_channels", "down_block_types", "up_block_types")}
    shutil.rmtree(variant / "vae")
    AutoencoderKL.from_config({**vae, **fewer}).save_pretrained(variant / "vae")
    config = parse_config(["--pretrained_model", str(variant), "--resolution", "40", *UNREAD])
    models = load_components(config, False, torch.float32, torch.device("cpu"))
    latents = torch.randn(1, 16, 10, 10)
    cond = models.family.condition(["a red circle"], [(40, 40)], [(0, 0)])
    with torch.no_grad():
        out = models.family.forward(models.policy, latents, torch.tensor([500.0]), cond)
    assert out.shape == latents.shape


def test_sd3_text_features_equal_the_pipelines_prompt_encoding(sd3, tiny_sd3_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    captions = ["a red circle on a gray background", ""]
    with torch.no_grad():  # as the pipeline's __call__ (sdpa's kernel differs with autograd on)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None,
                                                  do_classifier_free_guidance=False)  # fmt: skip
    cond = sd3.family.condition(captions, [(64, 64)] * 4, [(0, 0)] * 4)
    assert embeds.shape[1] == 77 + 256  # CLIP tokens then T5's max_sequence_length
    assert torch.equal(cond["encoder_hidden_states"], embeds.repeat(2, 1, 1))  # pairs: k = 2
    assert torch.equal(cond["pooled_projections"], pooled.repeat(2, 1))


def test_flux_text_features_and_call_equal_the_pipelines(flux, tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    captions = ["a red circle on a gray background"]
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(captions, None)
    cond = flux.family.condition(captions, [(64, 64)], [(0, 0)])
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert torch.equal(cond["txt_ids"], text_ids)

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(latents, 2, 16, 8, 8)
    assert torch.equal(pack_latents(latents), packed)
    assert torch.equal(unpack_latents(packed, 8, 8), latents)
    assert torch.equal(image_ids(8, 8, "cpu", torch.float32),
                       pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))  # fmt: skip
    cond = flux.family.condition(captions, [(64, 64)] * 2, [(0, 0)] * 2)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ours = flux.family.forward(pipe.transformer, latents, t, cond)
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=pooled.repeat(2, 1),
            encoder_hidden_states=embeds.repeat(2, 1, 1),
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        ).sample
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs, 64, 64, 8), rtol=0, atol=0)


# ---------------------------------------------------------------- end to end


def base_params(family: str, model) -> dict[str, torch.Tensor]:
    cls = FAMILIES[family][0]
    return dict(cls.from_pretrained(model, subfolder="transformer").named_parameters())


def base_cls_blocks(params: dict[str, torch.Tensor]) -> set[str]:
    return {n.split(".")[1] for n in params if n.startswith("transformer_blocks.")}


def generates(pipe) -> None:
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("loss", ["dpo", "kto", "sft"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_end_to_end(family, loss, request, toy_data_dir, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_dir")
    out = tmp_path / "out"
    # No weight decay: a parameter moves only if its gradient reached it.
    result = run(model, toy_data_dir, out, loss, "--weight_decay", "0")
    assert all(math.isfinite(step["loss"]) for step in result.history)
    assert result.unet_dir == out / "transformer"
    assert 'unet_dir="transformer"' in (out / "README.md").read_text()  # the model card's use
    base = base_params(family, model)
    cls, pipeline_cls = FAMILIES[family]
    trained = dict(cls.from_pretrained(out, subfolder="transformer").named_parameters())
    unmoved = {n for n, p in trained.items() if torch.equal(p, base[n])}
    # SD3's last block is context_pre_only: its text-token outputs are dropped, so the queries
    # of the text tokens (add_q_proj and its norm) reach nothing (as in the real checkpoints).
    last = f"transformer_blocks.{len(base_cls_blocks(trained)) - 1}.attn."
    dead = {last + n for n in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")}
    assert unmoved == (dead & set(trained) if family == "sd3" else set()), sorted(unmoved)[:5]
    if get_spec(loss).needs_reference:
        for name, param in result.models.reference.named_parameters():
            assert torch.equal(param, base[name]), f"reference parameter {name} moved"
    else:
        assert result.models.reference is None
    pipe = load_pipeline(model, unet_dir=result.unet_dir)
    assert isinstance(pipe, pipeline_cls)
    assert torch.equal(next(pipe.transformer.parameters()), next(iter(trained.values())))
    generates(pipe)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_reference_is_base_and_adapters_load(family, request, toy_data_dir, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_dir")
    result = run(model, toy_data_dir, tmp_path / "out", "dpo", "--lora_rank", "4",
                 "--learning_rate", "1e-2")  # fmt: skip
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at start
    assert result.unet_dir.name == "lora"
    policy, reference, fam = result.models.policy, result.models.reference, result.models.family
    base = FAMILIES[family][0].from_pretrained(model, subfolder="transformer")
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 8, generator=gen)
    cond = fam.condition(["a red circle", "a cat"], [(64, 64)] * 2, [(0, 0)] * 2)
    t = torch.tensor([100.0, 700.0])
    policy.eval()
    try:
        with torch.no_grad():
            expected = fam.forward(base, noisy, t, cond)
            assert torch.equal(fam.forward(reference, noisy, t, cond), expected)
            assert not torch.allclose(fam.forward(policy, noisy, t, cond), expected)

        def images(pipe):
            generator = torch.Generator().manual_seed(1)
            return pipe("a red circle", num_inference_steps=2, height=64, width=64,
                        generator=generator, output_type="np").images  # fmt: skip

        loaded = load_pipeline(model, lora_dir=result.unet_dir)
        in_memory = load_pipeline(model)
        in_memory.transformer = policy
        np.testing.assert_allclose(images(loaded), images(in_memory), atol=1e-5)
        assert np.abs(images(load_pipeline(model)) - images(loaded)).max() > 1e-4
    finally:
        policy.train()


def test_cached_run_equals_uncached_run_with_t5_features(tiny_sd3_dir, toy_data_dir, tmp_path):
    from safetensors.torch import load_file

    from data.cache import TEXT_PREFIX, caption_key
    from scripts.build_cache import main as build_cache_main

    cache = tmp_path / "cache"
    stats = build_cache_main(["--pretrained_model", str(tiny_sd3_dir), "--data",
                              str(toy_data_dir / "pickapic"), "--resolution", "64",
                              "--cache", str(cache)])  # fmt: skip
    texts = {}
    for shard in cache.glob(f"{TEXT_PREFIX}*.safetensors"):
        texts.update(load_file(shard))
    assert len(texts) == 2 * stats.captions_encoded  # one entry per distinct caption and feature
    hidden = texts[f"{caption_key('')}.encoder_hidden_states"]
    assert hidden.shape == (77 + 256, 48)  # CLIP-L/G padded to T5's width, then T5's 256 tokens
    common = ("--learning_rate", "0.1", "--adam_epsilon", "1")
    plain = run(tiny_sd3_dir, toy_data_dir, tmp_path / "plain", "dpo", *common)
    reset_accelerate()
    cached = run(tiny_sd3_dir, toy_data_dir, tmp_path / "cached", "dpo", *common,
                 "--cache", str(cache))  # fmt: skip
    assert cached.models.family.text_encoders == []
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_resume_reproduces_an_uninterrupted_flux_run(tiny_flux_dir, toy_data_dir, tmp_path):
    common = ("--train_batch_size", "1", "--lr_warmup_steps", "2", "--checkpointing_steps", "2")
    full = run(tiny_flux_dir, toy_data_dir, tmp_path / "full", "dpo", *common,
               "--max_train_steps", "3")  # fmt: skip
    part = tmp_path / "part"
    reset_accelerate()
    run(tiny_flux_dir, toy_data_dir, part, "dpo", *common, "--max_train_steps", "2")
    reset_accelerate()
    resumed = run(tiny_flux_dir, toy_data_dir, part, "dpo", *common, "--max_train_steps", "3",
                  "--resume_from_checkpoint", "latest")  # fmt: skip
    assert len(resumed.history) == 1
    assert resumed.history[0]["loss"] == full.history[2]["loss"]
    for (name, a), b in zip(
        full.models.policy.named_parameters(), resumed.models.policy.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_batch_two_equals_accumulation_two_on_sd3(tiny_sd3_dir, toy_data_dir, tmp_path):
    common = ("--learning_rate", "0.1", "--adam_epsilon", "1")
    big = run(tiny_sd3_dir, toy_data_dir, tmp_path / "big", "dpo", *common)
    reset_accelerate()
    small = run(tiny_sd3_dir, toy_data_dir, tmp_path / "small", "dpo", *common,
                "--train_batch_size", "1", "--gradient_accumulation_steps", "2")  # fmt: skip
    for a, b in zip(big.history, small.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_bf16_step0_is_log2_on_sd3(tiny_sd3_dir, toy_data_dir, tmp_path):
    """The fp32 policy under bf16 autocast and the bf16 reference compute the same errors at
    step 0: the reference keeps its RMSNorm weights and its positional-embedding buffer fp32."""
    result = run(tiny_sd3_dir, toy_data_dir, tmp_path / "out", "dpo", "--max_train_steps", "1",
                 "--mixed_precision", "bf16", "--beta", "5000")  # fmt: skip
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss", ["ipo", "hinge", "dmpo", "dspo", "mapo"])
def test_the_rest_of_the_loss_family_trains_sd3(loss, tiny_sd3_dir, toy_data_dir, tmp_path):
    """Every other registered loss on the flow family (dspo with the safeguard: per-pixel
    velocity predictions), with gradient checkpointing: finite, the policy moved."""
    extra = ("--winner_preserving_mu", "0.2") if loss == "dspo" else ()
    result = run(tiny_sd3_dir, toy_data_dir, tmp_path / "out", loss, "--max_train_steps", "1",
                 "--gradient_checkpointing", "true", *extra)  # fmt: skip
    assert math.isfinite(result.history[0]["loss"])
    base = base_params("sd3", tiny_sd3_dir)
    moved = [n for n, p in result.models.policy.named_parameters() if not torch.equal(p, base[n])]
    assert len(moved) > len(base) // 2


def test_evaluate_generates_and_scores_a_flow_run(tiny_flux_dir, toy_data_dir, tmp_path):
    import evaluate

    out = tmp_path / "run"
    run(tiny_flux_dir, toy_data_dir, out, "sft", "--max_train_steps", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n")
    _, table, _ = evaluate.main(
        ["--model", str(tiny_flux_dir), "--generate", "base", "--generate", f"sft={out}",
         "--prompts", str(prompts), "--num_seeds", "2", "--steps", "2", "--resolution", "64",
         "--scorer", "toy_warm", "--out", str(tmp_path / "eval")]
    )  # fmt: skip
    assert set(table["model"]) == {"base", "sft"} and (table["n"] == 2).all()  # 1 prompt x 2
    protocol = json.loads((tmp_path / "eval" / "protocol.json").read_text())
    assert "flow_euler" in json.dumps(protocol)  # what sampled, not the toy preset's ddim


def test_validation_samples_a_flow_policy_at_its_training_guidance(
    tiny_flux_dir, toy_data_dir, tmp_path, caplog
):
    """Flux-dev's pipeline feeds guidance_scale to the guidance embedding: with no
    --validation_guidance_scale, validation samples at the training guidance (--flux_guidance),
    and the saved config, the card and the start-up block say so (before: 1.0)."""
    from generate import generate, labelled_grid
    from tests.test_validation import pixels

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="prefdiff"):
        result = run(tiny_flux_dir, toy_data_dir, out, "dpo", "--validation_prompt",
                     "a red circle", "--validation_steps", "2", "--validation_images", "1",
                     "--validation_inference_steps", "2", "--flux_guidance", "4.5")  # fmt: skip
    assert [v.step for v in result.validation] == [0, 2]
    assert all((out / "validation" / f"step-{s}.png").is_file() for s in (0, 2))
    saved = json.loads((out / "train_config.json").read_text())["config"]
    assert saved["validation_guidance_scale"] == 4.5
    assert "2 steps, guidance 4.5, 64 px" in (out / "README.md").read_text()
    assert "validation: every 2 steps, guidance 4.5" in caplog.text

    # Step 0's grid is the base model's images at guidance 4.5, not at 1.
    def grid(guidance: float) -> np.ndarray:
        images = generate(load_pipeline(tiny_flux_dir), ["a red circle"], [0], steps=2,
                          guidance_scale=guidance, resolution=64, progress=False,
                          distinct_seeds=True)  # fmt: skip
        return np.asarray(labelled_grid(images, cell=64).convert("RGB"))

    step0 = pixels(out / "validation" / "step-0.png")
    assert np.array_equal(step0, grid(4.5))
    assert not np.array_equal(step0, grid(1.0))


def test_default_guidance_is_the_familys_training_guidance():
    """Flux-dev (guidance_embeds): --flux_guidance; Flux without the embedding, SD3: 1 (off)."""
    config = TrainConfig(flux_guidance=2.5)
    assert config.validation_guidance_scale is None  # resolved once the family is known
    dev, schnell = FluxFamily([], []), FluxFamily([], [])
    dev.configure({"guidance_embeds": True}, config)
    schnell.configure({"guidance_embeds": False}, config)
    assert (dev.default_guidance, schnell.default_guidance) == (2.5, 1.0)
    assert SD3Family([], []).default_guidance == 1.0
    config.resolve_family_defaults(dev.default_guidance)
    assert config.validation_guidance_scale == 2.5
    explicit = TrainConfig(validation_guidance_scale=1.0)
    explicit.resolve_family_defaults(3.5)
    assert explicit.validation_guidance_scale == 1.0  # a value the user gave is kept


def test_generate_samples_a_distilled_flux_at_the_pipelines_guidance(tiny_flux_dir):
    """generate.py with no --guidance_scale: guidance-distilled Flux (the tiny model has the
    embedding) at FluxPipeline's 3.5, since 1 would feed its embedding "no guidance"; Flux
    without the embedding, SD3 and the UNets at 1 (CFG off)."""
    repo = Path(__file__).resolve().parents[1]
    assert generation.default_guidance(tiny_flux_dir) == FLUX_DEFAULT_GUIDANCE == 3.5
    assert generation.default_guidance(repo / "assets" / "toy-sd3") == 1.0
    assert generation.default_guidance(repo / "assets" / "toy-sd15") == 1.0
    assert FluxFamily.sampling_guidance({"guidance_embeds": False}) == 1.0
    assert generate_cli.parse_args(["--prompt", "a", "--out", "x"]).guidance_scale is None

"""ptxray.models: every registered architecture, the vanilla U-Net's knobs, and weight loading.

CPU only, 64x64 inputs (pan needs 128), batch 2, each model built once per test.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import pytest
import torch
import torchvision
from torch import nn

from ptxray.config import Config, ModelConfig, VanillaUNetConfig
from ptxray.models import available_architectures, build_model, capabilities, count_parameters, describe_architecture
from ptxray.models.weights import adapt_first_conv

BASE = Config().model  # the defaults, with in_channels resolved from preprocess.channels (3)
PAPER_PARAMETERS = 790_000


@pytest.fixture(autouse=True, scope="module")
def _modest_threads():
    # One thread: these models are small at 64 px, and on 2 shared cores OpenMP threads spin
    # against other processes (2 threads made this file about 3x slower under load).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


_VANILLA_KEYS = {f.name for f in dataclasses.fields(VanillaUNetConfig)}


def cfg(**overrides) -> ModelConfig:
    """BASE with overrides; the unet_vanilla settings go to their nested model.vanilla."""
    vanilla = {k: overrides.pop(k) for k in list(overrides) if k in _VANILLA_KEYS}
    return dataclasses.replace(BASE, vanilla=dataclasses.replace(BASE.vanilla, **vanilla), **overrides)


# (arch, encoder, input px). Every registered architecture appears at least once.
FORWARD_CASES = [
    ("unet_vanilla", "", 64),
    ("unet", "resnet34", 64),
    ("unet", "efficientnet-b0", 64),
    ("unet", "densenet121", 64),
    ("unetplusplus", "resnet18", 64),
    ("manet", "resnet18", 64),
    ("linknet", "resnet18", 64),
    ("fpn", "resnet18", 64),
    ("pspnet", "resnet18", 64),
    ("deeplabv3", "resnet18", 64),
    ("deeplabv3plus", "resnet18", 64),
    ("pan", "resnet18", 128),  # its pyramid needs the 1/16 features to be at least 8x8
    ("upernet", "resnet18", 64),
    ("segformer", "resnet18", 64),
    ("dpt", "tu-vit_tiny_patch16_224", 64),  # smp's DPT takes timm ViTs only
    ("fcn", "resnet34", 64),
]


def test_forward_cases_cover_every_registered_architecture():
    # maskrcnn's train-mode forward takes (image, mask) and returns losses: tests/test_maskrcnn.py.
    assert {arch for arch, _, _ in FORWARD_CASES} == set(available_architectures()) - {"maskrcnn"}


@pytest.mark.parametrize("arch,encoder,px", FORWARD_CASES, ids=[f"{a}-{e or 'custom'}" for a, e, _ in FORWARD_CASES])
def test_forward_backward_shapes(arch, encoder, px):
    torch.manual_seed(0)
    model = build_model(cfg(arch=arch, encoder=encoder or BASE.encoder))
    model.train()
    x = torch.rand(2, 3, px, px)  # (B, C, H, W)
    seg, cls = model(x)
    assert seg.shape == (2, 1, px, px) and cls.shape == (2, 1)
    assert seg.dtype == cls.dtype == torch.float32
    assert torch.isfinite(seg).all() and torch.isfinite(cls).all()
    (seg.mean() + cls.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some parameters are not on the path of either output"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert px % model.input_multiple == 0 and px >= model.min_input_px


def test_parameters_no_output_uses_are_frozen():
    # pspnet runs 3 of resnet18's 5 stages; DDP would wait forever for layer3/layer4 gradients.
    model = build_model(cfg(arch="pspnet", encoder="resnet18"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("net.encoder.layer3.", "net.encoder.layer4.")) for n in frozen)
    assert "net.encoder.layer2.0.conv1.weight" not in frozen
    assert count_parameters(model) == count_parameters(model, trainable_only=False) - sum(
        p.numel() for p in model.parameters() if not p.requires_grad
    )
    assert "net.encoder.layer4.1.conv2.weight" in model.state_dict()  # still loads weights strictly
    assert model.training  # the probe left the mode alone


def test_vanilla_default_has_the_papers_parameter_count():
    model = build_model(BASE)
    n = count_parameters(model)
    assert abs(n - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05, n
    assert n == sum(p.numel() for p in model.parameters())  # all trainable, as in the paper
    assert count_parameters(build_model(cfg(base_filters=32))) > 3 * n  # widths drive the count


def test_vanilla_widths_follow_base_filters_and_growth():
    model = build_model(cfg(depth=4, base_filters=8, filter_growth=2.0, dropout=0.0))
    assert model.widths == (8, 16, 32, 64, 128)
    convs = [m for m in model.encoder_blocks.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[::2]] == [8, 16, 32, 64]
    assert convs[0].in_channels == 3
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    assert model.cls_head[-1].in_features == 128  # the head reads the bottleneck


@pytest.mark.parametrize("depth", [4, 5])
def test_vanilla_depths_work_at_64_px(depth):
    model = build_model(cfg(depth=depth)).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(model.encoder_blocks) == depth and len(pools) == 1  # one pool module, used per block
    seg, cls = model(torch.rand(2, 3, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 1)
    assert model.input_multiple == 2**depth


def test_vanilla_kernel_dilation_and_stride():
    model = build_model(cfg(depth=2, kernel_size=5, dilation=2, stride=2)).eval()
    first = model.encoder_blocks[0][0]
    assert first.kernel_size == (5, 5) and first.dilation == (2, 2) and first.stride == (2, 2)
    # stride 2 + 2x2 pooling: each block downsamples by 4, so inputs are multiples of 4**2.
    assert model.input_multiple == 16
    seg, _ = model(torch.rand(2, 3, 64, 64))
    assert seg.shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match=r"40x40.*multiples of 16"):
        model(torch.rand(2, 3, 40, 40))


def test_vanilla_rejects_bad_settings_by_name():
    with pytest.raises(ValueError, match=r"kernel_size=4.*odd"):
        build_model(cfg(kernel_size=4))
    with pytest.raises(ValueError, match=r"initializer='lecun'"):
        build_model(cfg(initializer="lecun"))


def test_dropout_changes_outputs_in_train_mode_only():
    # batch_norm off: BN alone would also make train and eval differ.
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    model = build_model(cfg(dropout=0.5, cls_dropout=0.5, batch_norm=False))
    rates = model.dropout_rates
    assert rates[-1] == 0.5 and all(a < b for a, b in zip(rates, rates[1:]))  # lower near the input
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    no_dropout = build_model(cfg(dropout=0.0, cls_dropout=0.0, batch_norm=False)).train()
    a, b = no_dropout(x), no_dropout(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_initializers_differ_and_match_their_keras_definitions():
    torch.manual_seed(0)
    glorot = build_model(cfg(initializer="glorot_uniform"))
    torch.manual_seed(0)
    he = build_model(cfg(initializer="he_normal"))
    w_g = glorot.bottleneck[0].weight.detach()  # (out, in, 3, 3)
    w_h = he.bottleneck[0].weight.detach()
    assert not torch.equal(w_g, w_h)
    fan_in = w_g[0].numel()
    fan_out = w_g.shape[0] * w_g[0, 0].numel()
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w_g.abs().max() <= bound
    assert float(w_g.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert float(w_h.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    assert w_h.abs().max() > bound  # a normal's tails pass the uniform's bound
    biases = [m.bias for m in glorot.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


@pytest.mark.parametrize(
    "arch,encoder,channels",
    [("unet_vanilla", "", 1), ("unet_vanilla", "", 5), ("unet", "resnet18", 1), ("fcn", "resnet18", 5)],
)
def test_other_channel_counts(arch, encoder, channels):
    model = build_model(cfg(arch=arch, encoder=encoder or BASE.encoder, in_channels=channels)).eval()
    seg, cls = model(torch.rand(2, channels, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 1)
    with pytest.raises(RuntimeError):  # the first conv really expects `channels` inputs
        model(torch.rand(2, channels + 1, 64, 64))


def test_registered_capabilities_say_what_the_builders_do():
    # has_encoder: model.encoder chooses the backbone exactly when the capability says so.
    for arch in available_architectures():
        caps = capabilities(arch)
        if caps.has_encoder:
            with pytest.raises(ValueError, match="resnet-nope"):
                build_model(cfg(arch=arch, encoder="resnet-nope"))
            assert describe_architecture(cfg(arch=arch, encoder="resnet34")) == f"{arch}(resnet34)"
        else:
            build_model(cfg(arch=arch, encoder="resnet-nope"))
            assert describe_architecture(cfg(arch=arch, encoder="resnet34")) == arch
    assert not capabilities("maskrcnn").compilable and capabilities("unet").compilable
    with pytest.raises(ValueError, match="resunet9000"):
        capabilities("resunet9000")


def test_unknown_arch_lists_registered_names():
    with pytest.raises(ValueError) as info:
        build_model(cfg(arch="resunet9000"))
    message = str(info.value)
    assert "resunet9000" in message
    for name in ("unet_vanilla", "unet", "fpn", "deeplabv3", "fcn"):
        assert repr(name) in message


def test_unknown_encoder_and_unresolved_channels_are_value_errors():
    with pytest.raises(ValueError, match=r"model.encoder='resnet-nope'.*unet"):
        build_model(cfg(arch="unet", encoder="resnet-nope"))
    with pytest.raises(ValueError, match=r"in_channels=0"):
        build_model(ModelConfig())


def test_non_multiple_input_is_a_value_error():
    model = build_model(cfg(arch="fpn", encoder="resnet18")).eval()
    with pytest.raises(ValueError, match=r"fpn: input 48x48 px.*multiples of 32"):
        model(torch.rand(1, 3, 48, 48))


# --- encoder weights -------------------------------------------------------------------------

_NEW_DENSENET = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")


def chexnet_layout(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision densenet121 keys -> the CheXNet checkpoint's (old naming, DataParallel prefix)."""
    out = {}
    for key, value in torchvision_state.items():
        if key.startswith("classifier."):
            continue
        out["module.densenet121." + _NEW_DENSENET.sub(r"\1.\2.", key)] = value
    out["module.densenet121.classifier.0.weight"] = torch.randn(14, 1024)
    out["module.densenet121.classifier.0.bias"] = torch.randn(14)
    return out


@pytest.fixture(scope="module")
def chexnet_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    densenet = torchvision.models.densenet121(weights=None)
    with torch.no_grad():  # BN buffers start at 0/1; make them distinguishable from a fresh model
        for name, buf in densenet.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
    state = chexnet_layout(densenet.state_dict())
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    assert "module.densenet121.features.denseblock4.denselayer16.conv.2.weight" in state
    folder = tmp_path_factory.mktemp("chexnet")
    path = folder / "model.pth.tar"
    torch.save({"state_dict": state, "epoch": 0, "arch": "densenet121"}, path)
    return path, state


def _write_broken(tmp_path, state, mutate) -> str:
    broken = dict(state)
    mutate(broken)
    path = tmp_path / "broken.pth.tar"
    torch.save({"state_dict": broken, "epoch": 0, "arch": "densenet121"}, path)
    return str(path)


CHECKED = [  # (smp encoder key, CheXNet key)
    ("features.denseblock1.denselayer1.norm1.weight", "features.denseblock1.denselayer1.norm.1.weight"),
    ("features.denseblock3.denselayer5.conv2.weight", "features.denseblock3.denselayer5.conv.2.weight"),
    ("features.denseblock4.denselayer16.norm2.running_var", "features.denseblock4.denselayer16.norm.2.running_var"),
    ("features.transition2.conv.weight", "features.transition2.conv.weight"),
    ("features.norm5.bias", "features.norm5.bias"),
]


def test_chexnet_weights_land_in_the_densenet121_encoder(chexnet_checkpoint, caplog):
    path, state = chexnet_checkpoint
    with caplog.at_level(logging.INFO, logger="ptxray"):
        model = build_model(cfg(arch="unet", encoder="densenet121", encoder_weights=f"chexnet:{path}"))
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CheXNet weights loaded")]
    n_tensors = sum(1 for k in state if k.startswith("module.densenet121.features."))
    assert loaded == [f"CheXNet weights loaded into the densenet121 encoder of unet: {n_tensors} tensors from {path} "
                      "(first conv adapted to 3 channel(s))"]  # fmt: skip
    encoder_state = model.encoder.state_dict()
    for ours, theirs in CHECKED:
        assert torch.equal(encoder_state[ours], state["module.densenet121." + theirs]), ours
    assert torch.equal(encoder_state["features.conv0.weight"], state["module.densenet121.features.conv0.weight"])
    seg, cls = model.eval()(torch.rand(2, 3, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 1)


def test_chexnet_into_one_channel_model_sums_rgb_and_tolerates_pre_0_4_checkpoints(chexnet_checkpoint, tmp_path):
    _, state = chexnet_checkpoint
    # The real checkpoint predates BatchNorm's num_batches_tracked buffers.
    path = _write_broken(tmp_path, state, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("num_batches_tracked")])
    model = build_model(cfg(arch="unet", encoder="densenet121", in_channels=1, encoder_weights=f"chexnet:{path}"))
    encoder_state = model.encoder.state_dict()
    rgb = state["module.densenet121.features.conv0.weight"]  # (64, 3, 7, 7)
    assert encoder_state["features.conv0.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(encoder_state["features.conv0.weight"], rgb.sum(dim=1, keepdim=True))
    for ours, theirs in CHECKED:
        assert torch.equal(encoder_state[ours], state["module.densenet121." + theirs]), ours
    seg, _ = model.eval()(torch.rand(2, 1, 64, 64))
    assert seg.shape == (2, 1, 64, 64)


def test_broken_chexnet_checkpoints_fail_naming_the_keys(chexnet_checkpoint, tmp_path):
    _, state = chexnet_checkpoint
    gone = "module.densenet121.features.denseblock2.denselayer3.conv.1.weight"
    path = _write_broken(tmp_path, state, lambda sd: sd.pop(gone))
    with pytest.raises(ValueError, match=r"missing keys 1 \(features\.denseblock2\.denselayer3\.conv1\.weight\)"):
        build_model(cfg(arch="unet", encoder="densenet121", encoder_weights=f"chexnet:{path}"))

    def wrong_shape(sd):
        sd["module.densenet121.features.norm5.weight"] = torch.ones(1023)

    path = _write_broken(tmp_path, state, wrong_shape)
    with pytest.raises(ValueError, match=r"features\.norm5\.weight: checkpoint \(1023,\) vs model \(1024,\)"):
        build_model(cfg(arch="unet", encoder="densenet121", encoder_weights=f"chexnet:{path}"))

    def extra_key(sd):
        sd["module.densenet121.features.denseblock5.denselayer1.conv.1.weight"] = torch.ones(1)

    path = _write_broken(tmp_path, state, extra_key)
    with pytest.raises(ValueError, match=r"unexpected keys 1 \(features\.denseblock5\.denselayer1\.conv1\.weight\)"):
        build_model(cfg(arch="unet", encoder="densenet121", encoder_weights=f"chexnet:{path}"))


def test_chexnet_needs_densenet121_and_vanilla_has_no_encoder(chexnet_checkpoint):
    path, _ = chexnet_checkpoint
    with pytest.raises(ValueError, match=r"model.encoder=densenet121, not 'resnet18'"):
        build_model(cfg(arch="unet", encoder="resnet18", encoder_weights=f"chexnet:{path}"))
    with pytest.raises(ValueError, match=r"'unet_vanilla' has no pretrained encoder"):
        build_model(cfg(arch="unet_vanilla", encoder_weights=str(path)))


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model(cfg(arch="fcn", encoder="resnet18", encoder_weights=str(tmp_path / "nowhere.pth")))


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory):
    """A torchvision-layout ImageNet classifier checkpoint (random values, real key layout)."""
    torch.manual_seed(2)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("imagenet") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_imagenet_classifier_checkpoint_loads_into_encoder_with_first_conv_adapted(imagenet_resnet18):
    path, state = imagenet_resnet18
    model = build_model(cfg(arch="fcn", encoder="resnet18", in_channels=5, encoder_weights=str(path)))
    encoder_state = model.encoder.state_dict()
    assert "fc.weight" in state and "fc.weight" not in encoder_state  # the head was dropped
    assert torch.equal(encoder_state["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert torch.equal(encoder_state["bn1.running_mean"], state["bn1.running_mean"])
    first = encoder_state["conv1.weight"]  # (64, 5, 7, 7): RGB repeated, scaled by 3/5
    assert first.shape == (64, 5, 7, 7)
    rgb = state["conv1.weight"]
    for c in range(5):
        assert torch.allclose(first[:, c], rgb[:, c % 3] * 3 / 5)


def test_timm_and_whole_model_state_dicts_load_into_encoders(tmp_path):
    import timm

    torch.manual_seed(5)
    timm_state = timm.create_model("resnet18", pretrained=False).state_dict()  # has fc.*
    torch.save(timm_state, tmp_path / "timm.pth")
    model = build_model(cfg(arch="unet", encoder="tu-resnet18", encoder_weights=str(tmp_path / "timm.pth")))
    assert torch.equal(model.encoder.state_dict()["model.layer2.1.conv1.weight"], timm_state["layer2.1.conv1.weight"])

    # A trained ptxray model's encoder reused in another architecture (decoder keys ignored).
    trained = build_model(cfg(arch="linknet", encoder="resnet18"))
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    reused = build_model(cfg(arch="fcn", encoder="resnet18", encoder_weights=str(tmp_path / "trained.pth")))
    for key, value in trained.encoder.state_dict().items():
        assert torch.equal(reused.encoder.state_dict()[key], value), key


def test_adapt_first_conv_keeps_the_response_to_a_grey_image():
    torch.manual_seed(3)
    rgb_weight = torch.randn(8, 3, 3, 3)
    grey = torch.rand(1, 1, 16, 16)
    expected = nn.functional.conv2d(grey.expand(1, 3, 16, 16), rgb_weight)
    for channels in (1, 3, 6):
        w = adapt_first_conv(rgb_weight, channels)
        assert w.shape == (8, channels, 3, 3)
        got = nn.functional.conv2d(grey.expand(1, channels, 16, 16), w)
        assert torch.allclose(got, expected, atol=1e-5), channels


def test_encoder_weights_from_s3(moto_s3, tmp_path):
    # mobilenet_v2: the smallest torchvision classifier smp has an encoder for (14 MB to upload).
    torch.manual_seed(4)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save({"state_dict": state}, path)
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="weights")
    s3.put_object(Bucket="weights", Key="imagenet/mobilenet_v2.pth", Body=path.read_bytes())
    model = build_model(
        cfg(arch="unet", encoder="mobilenet_v2", in_channels=1, encoder_weights="s3://weights/imagenet/mobilenet_v2.pth")
    )
    encoder_state = model.encoder.state_dict()
    assert torch.equal(encoder_state["features.17.conv.0.0.weight"], state["features.17.conv.0.0.weight"])
    assert torch.allclose(encoder_state["features.0.0.weight"], state["features.0.0.weight"].sum(1, keepdim=True))
    with pytest.raises(FileNotFoundError, match="s3://weights/imagenet/absent.pth"):
        build_model(cfg(arch="unet", encoder="mobilenet_v2", encoder_weights="s3://weights/imagenet/absent.pth"))


@pytest.mark.gpu
@pytest.mark.parametrize("arch,encoder", [("unet_vanilla", ""), ("unet", "resnet34"), ("deeplabv3", "resnet18")])
def test_cuda_bf16_channels_last(arch, encoder):
    # The runner's CUDA policy (ComputeConfig.amp, channels_last) is applied outside the model.
    model = build_model(cfg(arch=arch, encoder=encoder or BASE.encoder)).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        seg, cls = model(x)
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 1)
    assert torch.isfinite(seg.float()).all() and torch.isfinite(cls.float()).all()
    (seg.float().mean() + cls.float().mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

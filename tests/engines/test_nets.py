"""Reference networks: shapes, conditioning, traceability, config round trips."""

import pytest
import torch

from engines.nets import (
    Autoencoder,
    AutoencoderConfig,
    Classifier,
    ClassifierConfig,
    ConfigError,
    UNet,
    UNetConfig,
    config_from_dict,
    config_to_dict,
)

TINY = UNetConfig(channels=(8, 16), emb_dim=32, heads=2)


def inputs(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 28, 28, generator=g)
    return x, torch.randn(rows, generator=g), {"label": torch.randint(0, 11, (rows,), generator=g)}


def randomized(net: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output layers would make every comparison trivially equal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def test_unet_keeps_the_shape_and_exports_without_control_flow_on_data():
    net = randomized(UNet(TINY))
    x, t, cond = inputs(3, 0)
    # torch.export (what the ONNX exporter runs) fails on Python control flow on data
    exported = torch.export.export(net, (x, t, cond)).module()
    x2, t2, cond2 = inputs(3, 1)
    out = net(x2, t2, cond2)
    assert out.shape == x2.shape
    torch.testing.assert_close(exported(x2, t2, cond2), out, rtol=1e-4, atol=1e-5)


def test_missing_conditioning_is_the_null_label_and_labels_matter():
    net = randomized(UNet(TINY))
    x, t, _ = inputs(2, 0)
    null = {"label": torch.full((2,), TINY.classes)}
    torch.testing.assert_close(net(x, t, None), net(x, t, null))
    assert not torch.allclose(net(x, t, {"label": torch.tensor([0, 1])}), net(x, t, null))


def test_guidance_embedding_starts_at_zero_so_a_student_begins_as_its_teacher():
    teacher = randomized(UNet(TINY))
    student = UNet(UNetConfig(**{**config_to_dict(TINY), "guidance_dim": 16})).eval()
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["guidance.bias", "guidance.weight"]
    x, t, cond = inputs(2, 0)
    with pytest.raises(ValueError, match="w_embedding"):
        student(x, t, cond)
    w = {**cond, "w_embedding": torch.randn(2, 16)}
    torch.testing.assert_close(student(x, t, w), teacher(x, t, cond))


def test_unet_handles_odd_latent_sizes():
    net = randomized(UNet(UNetConfig(in_channels=4, channels=(16, 32), emb_dim=32)))
    z = torch.randn(2, 4, 7, 7)
    assert net(z, torch.zeros(2), None).shape == z.shape


def test_autoencoder_maps_28x28_to_4x7x7_and_back_into_range():
    ae = Autoencoder(AutoencoderConfig(scale=2.0)).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 4, 7, 7)
    torch.testing.assert_close(z, ae.encoder(x) * 2.0)
    out = ae.decode(z)
    assert out.shape == x.shape and out.abs().max() <= 1


def test_classifier_features_feed_the_logits():
    clf = Classifier(ClassifierConfig(channels=(8, 16), features=24)).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert clf.features(x).shape == (4, 24)
    torch.testing.assert_close(clf(x), clf.logits(clf.features(x)))


def test_configs_round_trip_and_name_the_wrong_key():
    assert config_from_dict(UNetConfig, config_to_dict(TINY)) == TINY
    with pytest.raises(ConfigError, match="unknown key 'chanels'"):
        config_from_dict(UNetConfig, {"chanels": [8]})
    with pytest.raises(ConfigError, match="blocks must be of type"):
        config_from_dict(UNetConfig, {"blocks": 1.5})
    with pytest.raises(ConfigError, match="multiples of groups"):
        config_from_dict(UNetConfig, {"channels": [12]})

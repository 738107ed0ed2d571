import pytest
import torch

from models.ema import ExponentialMovingAverage


def test_update_formula_with_warmup() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([p], decay=0.9999)
    expected = torch.zeros(3)
    for n in range(1, 6):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([p])
        d = min(0.9999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p.detach()
    torch.testing.assert_close(ema.shadow_params[0], expected)


def test_store_copy_restore_roundtrip() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(layer.parameters(), decay=0.5, use_num_updates=False)
    original = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(2.0)
    ema.update(layer.parameters())
    trained = [p.detach().clone() for p in layer.parameters()]
    ema.store(layer.parameters())
    ema.copy_to(layer.parameters())
    for p, o in zip(layer.parameters(), original, strict=True):
        torch.testing.assert_close(p.detach(), o + 1.0)
    ema.restore(layer.parameters())
    for p, t in zip(layer.parameters(), trained, strict=True):
        torch.testing.assert_close(p.detach(), t)


def test_state_dict_roundtrip_and_mismatch() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(layer.parameters(), decay=0.9)
    ema.update(layer.parameters())
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params", "collected_params"}
    other = ExponentialMovingAverage(torch.nn.Linear(3, 2).parameters(), decay=0.1)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.decay == 0.9
    for a, b in zip(other.shadow_params, ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="different model|shape"):
        ExponentialMovingAverage(torch.nn.Linear(4, 2).parameters(), 0.9).load_state_dict(state)


def test_nested_ema_swaps_restore_the_raw_weights() -> None:
    """Validation swaps the EMA in; a callback that samples inside it (generative perplexity) swaps
    again. The inner swap must not store the EMA weights as the "raw" ones: training would go on
    from the EMA weights."""
    import functools

    from algorithms import AR
    from diffusion import Diffusion

    module = Diffusion(backbone=torch.nn.Linear(3, 2), algorithm=AR(0),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1), ema_decay=0.5)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(2.0)
    module.ema.update(module.trainable_parameters())
    raw = [p.detach().clone() for p in module.trainable_parameters()]
    ema = [s.clone() for s in module.ema.shadow_params]
    with module.ema_weights():            # on_validation_epoch_start ... on_validation_epoch_end
        with module.ema_weights():        # Diffusion.generate, called by a callback
            assert all(torch.equal(p, e) for p, e in zip(module.trainable_parameters(), ema, strict=True))
        assert all(torch.equal(p, e) for p, e in zip(module.trainable_parameters(), ema, strict=True))
    assert all(torch.equal(p, r) for p, r in zip(module.trainable_parameters(), raw, strict=True))


def test_a_checkpoint_written_during_an_ema_swap_holds_the_training_weights() -> None:
    """A preemption during validation saves while the EMA weights are swapped in: the checkpoint's
    state dict must still be the training weights (every name of a tied weight), and the EMA entry
    the averages. (It held the averages as training weights, and the resumed run diverged.)"""
    import functools

    from algorithms import AR
    from diffusion import Diffusion

    backbone = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4))
    backbone[1].weight = torch.nn.Parameter(torch.randn(4, 3))
    backbone.tied = backbone[1]  # the same module (and weights) under a second name
    module = Diffusion(backbone=backbone, algorithm=AR(0),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1), ema_decay=0.5)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(2.0)
    raw = {k: v.clone() for k, v in module.state_dict().items()}
    ema = [s.clone() for s in module.ema.shadow_params]
    with module.ema_weights():
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
    assert "backbone.tied.weight" in checkpoint["state_dict"]
    assert checkpoint["state_dict"].keys() == raw.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], raw[k]) for k in raw)
    assert all(torch.equal(a, b) for a, b in zip(checkpoint["ema"]["shadow_params"], ema, strict=True))
    assert checkpoint["ema"]["collected_params"] == []

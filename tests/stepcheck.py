"""What the tests of the hand-written training steps share (test_vae_step, test_totalvae_step)."""

import copy

import torch


def both(step, module, tensors, kl_weight=0.3, seed=1):
    """(reference module, its output) by forward + backward and (copy, output) by ``step``.

    Both start from the same random state and must leave it the same: the step draws the
    module's random numbers, in the same order.
    """
    ref, fused = module, copy.deepcopy(module)
    torch.manual_seed(seed)
    out_ref = ref(tensors, kl_weight=kl_weight)
    out_ref.loss.backward()
    after_ref = torch.randn(3)  # the random stream after the step
    torch.manual_seed(seed)
    out = step(fused, tensors, kl_weight)
    assert out is not None
    assert torch.equal(torch.randn(3), after_ref)  # the same draws, in the same order
    return (ref, out_ref), (fused, out)


def assert_declines(step, module, tensors):
    """``step`` returns None and changes nothing: no gradient, buffer or random draw."""
    state = copy.deepcopy(module.state_dict())
    torch.manual_seed(1)
    assert step(module, tensors, 0.3) is None
    after = torch.randn(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.randn(3))  # it drew no random number
    assert all(p.grad is None for p in module.parameters())
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


def replace_forward(module):
    """A ``forward`` of the user's in the instance's dict (the step must leave it to run)."""
    forward = module.forward
    module.forward = lambda tensors, kl_weight=1.0: forward(tensors, kl_weight)


def count_steps(monkeypatch, cls) -> dict:
    """Count ``cls``'s hand-written steps taken and forward passes in training, in the dict."""
    calls = {"step": 0, "forward": 0}
    step, forward = cls.training_step, cls.forward

    def counted_step(self, tensors, kl_weight=1.0):
        out = step(self, tensors, kl_weight)
        calls["step"] += out is not None
        return out

    def counted_forward(self, tensors, kl_weight=1.0):
        calls["forward"] += self.training
        return forward(self, tensors, kl_weight)

    monkeypatch.setattr(cls, "forward", counted_forward)
    monkeypatch.setattr(cls, "training_step", counted_step)
    return calls


def assert_same_training(fused, autograd):
    """Two trained models' loss histories (to 1e-5) and latent spaces (to 1e-3) agree."""
    for key in ("train_loss", "validation_elbo"):
        torch.testing.assert_close(
            torch.tensor(fused.history_[key]), torch.tensor(autograd.history_[key]), rtol=1e-5,
            atol=0,
        )  # fmt: skip
    z1, z2 = fused.get_latent_representation(), autograd.get_latent_representation()
    torch.testing.assert_close(torch.from_numpy(z1), torch.from_numpy(z2), rtol=1e-3, atol=1e-4)

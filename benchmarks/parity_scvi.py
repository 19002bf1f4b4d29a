"""Numerical parity of cellvae against scvi-tools with IDENTICAL weights (SCVI and TOTALVI).

scvi-tools' model is trained briefly; its module's state dict (batch-norm running statistics,
dispersions and library-prior buffers included) is copied into a cellvae module of the same
architecture by an explicit name mapping, and the cellvae model is marked trained the way
``BaseModel.load`` restores one (``module_`` set, ``eval()``, ``is_trained_ = True``). Both models
then run in eval mode on the same cells and their outputs are compared entry by entry:

* deterministic quantities (posterior means and variances, decoder outputs at a fixed z, the
  per-cell log-likelihood at a fixed z): float32 tolerance, ``|a - b| <= 1e-4 |b| + 1e-5 max|b|``;
* quantities that draw noise (``get_elbo``, ``get_reconstruction_error``): first with the same
  noise (both tools draw z from torch's global generator in the same order and shapes, so the
  same seed gives the same z; scvi-tools' DataLoader draws one int64 seed first, which the
  cellvae call reproduces), at float32 tolerance;
* Monte-Carlo estimators (``get_marginal_ll``, ``get_normalized_expression`` with many samples):
  statistical agreement, the mean difference over cells within 4 standard errors estimated from
  repeated runs.

scvi-tools' ``get_normalized_expression`` and ``get_likelihood_parameters`` decode ONE SAMPLE of z
when ``n_samples=1`` (cellvae decodes the posterior mean), and its TOTALVI decoder always samples
the protein background (cellvae's getters use its log-normal mean). Those are compared with
scvi-tools' module internals at the posterior mean instead (``reference = scvi internals``).

Findings (the ``cause`` column names the one that explains an expected mismatch):

* T1 (deliberate): scvi-tools 1.4's totalVI encoder reads ``log(1 + x / (1 + mean x))``; cellvae
  keeps the totalVI paper's ``log1p(x)``. The row "cellvae encoder on scvi's input transform"
  shows that the encoders agree given the same input.
* T2, T4, T5 (fixed in cellvae in session 36; before, emulated here with forward hooks): the
  background scale ``back_beta`` is ``softplus(.) + 1e-8`` (cellvae had ``exp``); each output
  head of the totalVI decoder adds the batch / covariate one-hot (cellvae's heads had none: now
  ``decoder.head_covariates``, mapped from scvi-tools' one-hot weight columns); the genes'
  zero-inflation head reads the mixing stack's ``[h_mixing, z]``. The decoder rows at a fixed z
  now compare the plain cellvae decoder.
* T3 (deliberate): scvi-tools 1.4's per-batch protein efficiency, its log-normal prior, the
  Bernoulli penalty on the mixing and ``kl_weight`` on the protein reconstruction are not in
  cellvae, which follows the paper (rows measure their size within scvi-tools).
* S1 / T6 (by design): cellvae's ``n_samples=1`` getters use posterior means (of z, and of the
  protein background), scvi-tools' one sample.
* T7 (scvi-tools bug): with several ``transform_batch`` values, scvi-tools' totalVI
  ``get_normalized_expression`` multiplies its running sum by ``library_size`` per batch.
* T8 (deliberate, documented in cellvae's ``TOTALVI.get_normalized_expression``, not in
  docs/math.md): with proteins missing from a batch and a list of ``transform_batch``es, cellvae
  averages each protein over the listed batches that measured it
  (cellvae/model/totalvi.py, ``_decode_into``); scvi-tools over all of them
  (scvi/model/_totalvi.py, ``get_normalized_expression`` and
  ``get_protein_foreground_probability``). The rows "measuring batches" pass, the rows
  "all batches" differ on the masked proteins only.
* ``latent_distribution="ln"``: both tools' ``give_mean`` latent is a Monte-Carlo estimate of
  E[softmax(u)] (scvi-tools 5,000 random draws, cellvae 512 scrambled Sobol points), compared
  statistically; the getters' posterior mean is ``softmax(qz mean)`` in both (the reference of
  ``scvi_vae_point``). ``get_marginal_ll`` is not compared: cellvae raises NotImplementedError,
  and scvi-tools' ``VAE.marginal_ll`` evaluates the normal densities p(z) and q(z | x) at
  softmax(u) (scvi/module/_vae.py, ``marginal_ll``), not an importance weight of the logistic
  normal.

Options covered (default run): SCVI with ZINB / NB / Poisson, a latent library, dispersion per
gene-batch, gene-label (Kang's cell types) and gene-cell, categorical + continuous covariates
(synthetic: ``with_covariates``) in the decoder only and with ``encode_covariates``, two layers
with and without ``deeply_inject_covariates``, and the logistic normal; TOTALVI with NB / ZINB,
two synthetic batches, a categorical covariate, six proteins missing from one batch
(``protein_batch_mask``, masked likelihood and KL, getters over ``transform_batch``) and a latent
library. ``--extended`` adds combinations (all SCVI options at once; TOTALVI with continuous
covariates; ZINB + missing proteins + covariate + latent library) and ``get_marginal_ll`` for
every SCVI variant. Not compared, for want of a counterpart: scvi-tools' SCVI
``batch_representation="embedding"`` and TOTALVI ``encode_covariates=False`` (cellvae's TOTALVI
always encodes the covariates, scvi-tools' default); the adversarial batch classifier (both
switch it on when a batch lacks a protein, but scvi-tools' lives in its training plan with
another architecture, and it enters the training loss only).

    .venv/bin/python benchmarks/parity_scvi.py               # ~4.5 min on 1 thread
    .venv/bin/python benchmarks/parity_scvi.py --extended    # + combinations (~6 min)
    .venv/bin/python benchmarks/parity_scvi.py --quick       # fewer epochs and samples (~2 min)

Writes ``benchmarks/results/parity.csv``. scvi-tools is imported here only (never by cellvae).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

from _common import RESULTS, print_table, write_csv  # noqa: E402
from simulate import eccite_hvg, kang_hvg  # noqa: E402

RTOL, ATOL_REL = 1e-4, 1e-5  # float32 tolerance: |a - b| <= RTOL |b| + ATOL_REL max|b|
MC_Z = 4.0  # Monte-Carlo agreement: |mean difference| within MC_Z standard errors
LIB = 10_000.0
SEED = 0
ROWS: list[dict] = []


# =========================================================================== comparison rows
def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if hasattr(a, "to_numpy"):
        a = a.to_numpy()
    return np.asarray(a, dtype=np.float64)


def exact(
    model: str,
    quantity: str,
    cv,
    ref,
    *,
    ref_name: str = "scvi getter",
    note: str = "",
    cause: str = "",
):
    """A deterministic comparison: cellvae ``cv`` against the reference ``ref``. ``cause``: the
    finding that explains an expected mismatch (named in the verdict when it fails)."""
    a, b = _np(cv), _np(ref)
    if a.shape != b.shape:
        ROWS.append(
            dict(
                model=model,
                quantity=quantity,
                n=a.size,
                verdict="FAIL",
                cause=cause,
                reference=ref_name,
                note=f"shape {a.shape} vs {b.shape}; {note}",
            )
        )
        return
    diff = np.abs(a - b)
    scale = np.abs(b).max() if b.size else 0.0
    tol = RTOL * np.abs(b) + ATOL_REL * scale + 1e-30
    big = np.abs(b) >= 1e-3 * scale  # relative error where the value is not ~0
    row = dict(
        model=model,
        quantity=quantity,
        n=a.size,
        reference=ref_name,
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float((diff[big] / np.abs(b[big])).max()) if big.any() else 0.0,
        worst_over_tol=float((diff / tol).max()) if diff.size else 0.0,
        max_ref=float(scale),
    )
    ok = bool(np.isfinite(a).all() and (diff <= tol).all())
    row["verdict"] = "pass" if ok else (f"FAIL ({cause})" if cause else "FAIL")
    row["cause"] = cause
    row["note"] = note
    ROWS.append(row)
    return ok


def monte_carlo(
    model: str,
    quantity: str,
    cv_runs,
    ref_runs,
    *,
    ref_name="scvi getter",
    note="",
    per_entry: bool = False,
):
    """Statistical agreement of two Monte-Carlo estimators; ``cv_runs`` / ``ref_runs``: lists of
    arrays from independent draws of each tool.

    Per cell (``per_entry=False``, a few repeats): the mean difference over cells within
    ``MC_Z`` standard errors (``z``), and the spread of the cross-tool differences no larger
    than twice that of the within-tool differences (``var_ratio``; chance alone stays < ~1.7
    at 64 cells). Per entry (``per_entry=True``, many draws, e.g. normalised expression whose
    rows sum to a constant so that a mean over entries tells nothing): each entry's
    difference of means over its standard error; pass when the mean of their squares is
    <= 1.2 (1 expected) and fewer than 1e-3 of them exceed 5.
    """
    c = np.stack([_np(r) for r in cv_runs])
    s = np.stack([_np(r) for r in ref_runs])
    rc, rs = len(c), len(s)
    mc, ms = c.mean(0), s.mean(0)
    vc = c.var(0, ddof=1) if rc > 1 else np.zeros_like(mc)
    vs = s.var(0, ddof=1) if rs > 1 else np.zeros_like(ms)
    n = mc.size
    d_mean = float((mc - ms).mean())
    diff = np.abs(c[0] - s[0])
    big = np.abs(s[0]) >= 1e-3 * np.abs(s[0]).max()
    row = dict(
        model=model,
        quantity=quantity,
        n=n,
        reference=ref_name,
        max_abs=float(diff.max()),
        max_rel=float((diff[big] / np.abs(s[0][big])).max()),
        mean_diff=d_mean,
        max_ref=float(np.abs(s[0]).max()),
        note=note,
    )
    if per_entry:
        se_e = np.sqrt(vc / rc + vs / rs)
        scale = np.abs(ms).max()
        z_e = (mc - ms) / np.maximum(se_e, 1e-7 * scale + 1e-30)
        z2, tail = float((z_e**2).mean()), float((np.abs(z_e) > 5).mean())
        row.update(z=float(np.sqrt(z2)), stat=f"mean z^2 {z2:.3f}, P(|z|>5) {tail:.1e}")
        ok = z2 <= 1.2 and tail <= 1e-3
    else:
        se = float(np.sqrt((vc / rc + vs / rs).sum()) / n)
        z = d_mean / se if se > 0 else math.inf
        cross = (c[0] - s[0]).ravel()
        within = np.concatenate([(c[0] - c[1]).ravel(), (s[0] - s[1]).ravel()])
        ratio = float((cross**2).mean() / (within**2).mean())
        row.update(mc_se=se, z=float(z), stat=f"z {z:.2f}, var ratio {ratio:.2f}")
        ok = abs(z) <= MC_Z and ratio <= 2.0
    row["verdict"] = "pass (MC)" if ok else "FAIL (MC)"
    ROWS.append(row)
    return ok


def against_se(model: str, quantity: str, cv, ref, se, *, ref_name="scvi getter", note=""):
    """Two Monte-Carlo estimates of the same per-entry expectation, ``se`` the standard error of
    their difference per entry: pass when the mean of the squared z-scores is <= 1.2 (1
    expected; less where ``se`` is conservative) and fewer than 1e-3 of them exceed 5."""
    a, b, se = _np(cv), _np(ref), _np(se)
    diff = a - b
    z_e = diff / np.maximum(se, 1e-7 * np.abs(b).max() + 1e-30)
    z2, tail = float((z_e**2).mean()), float((np.abs(z_e) > 5).mean())
    big = np.abs(b) >= 1e-3 * np.abs(b).max()
    ok = bool(np.isfinite(a).all() and z2 <= 1.2 and tail <= 1e-3)
    ROWS.append(
        dict(
            model=model,
            quantity=quantity,
            n=a.size,
            reference=ref_name,
            max_abs=float(np.abs(diff).max()),
            max_rel=float((np.abs(diff)[big] / np.abs(b[big])).max()),
            mean_diff=float(diff.mean()),
            max_ref=float(np.abs(b).max()),
            z=float(np.sqrt(z2)),
            stat=f"mean z^2 {z2:.3f}, P(|z|>5) {tail:.1e}",
            verdict="pass (MC)" if ok else "FAIL (MC)",
            note=note,
        )
    )
    return ok


def info(model: str, quantity: str, value: str, note: str = ""):
    ROWS.append(dict(model=model, quantity=quantity, verdict="info", note=f"{value}; {note}"))


# =========================================================================== training / mapping
@contextlib.contextmanager
def quiet():
    """Silence Lightning's and scvi-tools' console output."""
    for name in (
        "scvi",
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_fabric",
        "pytorch_lightning",
        "cellvae",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
    torch.set_num_threads(1)  # in case anything changed it


def train_scvi_tools(cls, adata, epochs: int, setup: dict, **model_kwargs):
    import scvi

    with quiet():
        scvi.settings.seed = SEED
        cls.setup_anndata(adata, **setup)
        model = cls(adata, **model_kwargs)
        model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    torch.set_num_threads(1)
    model.module.eval()
    return model


def map_fc(S: dict, sp: str, fc, cp: str, out: dict, used: set) -> None:
    """scvi-tools' FCLayers ``sp`` into cellvae's FCLayers module ``fc`` (prefix ``cp``).

    scvi-tools: ``Linear(n_in + Σ one-hot)`` on ``[h, one_hot(c1), ...]``, weight (out, in).
    cellvae: ``_CovariateLinear``: input-major weight (in, out) plus one embedding (n_cat, out)
    per covariate, added after the product; BatchNorm1d is ``post.i.0`` (scvi ``Layer i.1``).
    """
    for i, lin in enumerate(fc.linears):
        w = S[f"{sp}.fc_layers.Layer {i}.0.weight"]
        n_in = lin.weight.shape[0]
        n_cov = sum(e.num_embeddings for e in lin.embeddings)
        assert w.shape[1] == n_in + n_cov, (sp, i, tuple(w.shape), n_in, n_cov)
        out[f"{cp}.linears.{i}.weight"] = w[:, :n_in].T.contiguous()
        off = n_in
        for j, emb in enumerate(lin.embeddings):
            out[f"{cp}.linears.{i}.embeddings.{j}.weight"] = w[:, off : off + emb.num_embeddings].T
            off += emb.num_embeddings
        used.add(f"{sp}.fc_layers.Layer {i}.0.weight")
        if lin.bias is not None:
            out[f"{cp}.linears.{i}.bias"] = S[f"{sp}.fc_layers.Layer {i}.0.bias"]
            used.add(f"{sp}.fc_layers.Layer {i}.0.bias")
        if len(fc.post[i]) and isinstance(fc.post[i][0], torch.nn.BatchNorm1d):
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                out[f"{cp}.post.{i}.0.{k}"] = S[f"{sp}.fc_layers.Layer {i}.1.{k}"]
                used.add(f"{sp}.fc_layers.Layer {i}.1.{k}")


def map_linear(S, sk, ck, out, used, n_keep: int | None = None) -> torch.Tensor | None:
    """A Linear (or a 1-layer FCLayers used as a linear head). ``n_keep``: the input columns of
    cellvae's layer; columns beyond them (scvi-tools' one-hot covariates) are returned,
    (out, n_cov), for :func:`map_covariate_vectors`, or None when there are none."""
    w = S[f"{sk}.weight"]
    extra = None
    if n_keep is not None and w.shape[1] > n_keep:
        extra = w[:, n_keep:]
        w = w[:, :n_keep]
    out[f"{ck}.weight"] = w.contiguous()
    out[f"{ck}.bias"] = S[f"{sk}.bias"]
    used.update({f"{sk}.weight", f"{sk}.bias"})
    return extra


def map_covariate_vectors(w_cov: torch.Tensor | None, cov, cp: str, out: dict) -> None:
    """scvi-tools' one-hot weight columns of a head, ``w_cov`` (out, Σ n_cat; None: no covariate
    with more than one category), into cellvae's ``CovariateVectors`` ``cov`` (prefix ``cp``):
    one embedding (n_cat, out) per covariate, in scvi-tools' column order (batch first)."""
    n_cov = sum(e.num_embeddings for e in cov.embeddings)
    got = 0 if w_cov is None else w_cov.shape[1]
    assert got == n_cov, (cp, got, n_cov)
    off = 0
    for j, emb in enumerate(cov.embeddings):
        out[f"{cp}.embeddings.{j}.weight"] = w_cov[:, off : off + emb.num_embeddings].T
        off += emb.num_embeddings


def adopt(cv_model, state: dict) -> None:
    """Build the cellvae module and load ``state`` into it as ``BaseModel.load`` does
    (cellvae/model/_base.py, ``load``: ``_build_module`` → ``load_state_dict`` → ``eval`` →
    ``is_trained_``). Strict: every cellvae parameter and buffer must be mapped."""
    with torch.random.fork_rng(devices=[]):
        cv_model.module_ = cv_model._build_module()
    own = cv_model.module_.state_dict()
    for k, v in own.items():  # dtypes / shapes as cellvae keeps them
        if k in state:
            state[k] = state[k].to(v.dtype).reshape(v.shape)
    missing = sorted(set(own) - set(state))
    # buffers that cellvae computes from the registry and scvi-tools has no counterpart of
    for k in missing:
        if k.endswith("protein_batch_mask"):
            state[k] = own[k]
        # cellvae's adversarial batch classifier is part of its module; scvi-tools' lives in
        # its training plan (another architecture). It enters the training loss only, never a
        # getter, the ELBO or the reconstruction error: cellvae's own initial weights stay
        if k.startswith("classifier."):
            state[k] = own[k]
    cv_model.module_.load_state_dict(state, strict=True)
    cv_model.module_.eval()
    cv_model.is_trained_ = True


def scvi_state_to_cellvae_vae(S: dict, cmod) -> tuple[dict, set]:
    out, used = {}, set()
    if "px_r" in S and cmod.dispersion != "gene-cell":
        # scvi-tools keeps gene-batch / gene-label dispersions (genes, categories); cellvae
        # (categories, genes): a transpose, not a reshape
        out["px_r"] = S["px_r"].T if S["px_r"].dim() == 2 else S["px_r"]
        used.add("px_r")
    map_fc(S, "z_encoder.encoder", cmod.z_encoder.encoder, "z_encoder.encoder", out, used)
    for h in ("mean_encoder", "var_encoder"):
        map_linear(S, f"z_encoder.{h}", f"z_encoder.{h}", out, used)
    if cmod.l_encoder is not None:
        map_fc(S, "l_encoder.encoder", cmod.l_encoder.encoder, "l_encoder.encoder", out, used)
        for h in ("mean_encoder", "var_encoder"):
            map_linear(S, f"l_encoder.{h}", f"l_encoder.{h}", out, used)
        out["library_log_means"] = S["library_log_means"].reshape(-1)
        out["library_log_vars"] = S["library_log_vars"].reshape(-1)
        used.update({"library_log_means", "library_log_vars"})
    map_fc(S, "decoder.px_decoder", cmod.decoder.px_decoder, "decoder.px_decoder", out, used)
    map_linear(S, "decoder.px_scale_decoder.0", "decoder.px_scale_decoder", out, used)
    if cmod.decoder.px_dropout_decoder is not None:
        map_linear(S, "decoder.px_dropout_decoder", "decoder.px_dropout_decoder", out, used)
    if cmod.decoder.px_r_decoder is not None:
        map_linear(S, "decoder.px_r_decoder", "decoder.px_r_decoder", out, used)
    return out, used


def scvi_state_to_cellvae_totalvae(S: dict, cmod) -> tuple[dict, set, dict]:
    """The TOTALVAE state; also returns each head's one-hot weight columns (for the info row)."""
    out, used, head_cov = {}, set(), {}
    for k in ("px_r", "py_r"):  # per batch / label: (features, categories) -> transposed
        out[k] = S[k].T if S[k].dim() == 2 else S[k]
    out["prior_mean"] = S["background_pro_alpha"]
    out["prior_log_scale"] = S["background_pro_log_beta"]
    used.update({"px_r", "py_r", "background_pro_alpha", "background_pro_log_beta"})
    enc = cmod.encoder
    map_fc(S, "encoder.encoder", enc.encoder, "encoder.encoder", out, used)
    for h in ("z_mean_encoder", "z_var_encoder"):
        map_linear(S, f"encoder.{h}", f"encoder.{h}", out, used)
    if enc.latent_library:
        map_fc(S, "encoder.l_gene_encoder", enc.l_encoder, "encoder.l_encoder", out, used)
        map_linear(S, "encoder.l_gene_mean_encoder", "encoder.l_mean_encoder", out, used)
        map_linear(S, "encoder.l_gene_var_encoder", "encoder.l_var_encoder", out, used)
        out["library_log_means"] = S["library_log_means"].reshape(-1)
        out["library_log_vars"] = S["library_log_vars"].reshape(-1)
        used.update({"library_log_means", "library_log_vars"})
    dec = cmod.decoder
    stacks = {
        "px_decoder": "px_decoder",
        "py_back_decoder": "py_back_decoder",
        "py_fore_decoder": "py_fore_decoder",
        "sigmoid_decoder": "py_mixing_decoder",
    }
    for s, c in stacks.items():
        map_fc(S, f"decoder.{s}", getattr(dec, c), f"decoder.{c}", out, used)
    n_cat = dec.px_scale_decoder.in_features
    # scvi-tools head -> (cellvae head, its key in decoder.head_covariates)
    heads = {
        "px_scale_decoder": ("px_scale_decoder", "px_scale"),
        "py_back_mean_log_alpha": ("py_back_alpha", "back_alpha"),
        "py_back_mean_log_beta": ("py_back_beta", "back_beta"),
        "py_fore_scale_decoder": ("py_fore_scale", "fore_scale"),
        "py_background_decoder": ("py_mixing", "mixing"),
    }
    if dec.px_dropout_decoder is not None:
        heads["px_dropout_decoder_gene"] = ("px_dropout_decoder", "px_dropout")
    assert set(dec.head_covariates) == {k for _, k in heads.values()}, list(dec.head_covariates)
    for s, (c, k) in heads.items():
        w = map_linear(
            S, f"decoder.{s}.fc_layers.Layer 0.0", f"decoder.{c}", out, used, n_keep=n_cat
        )
        map_covariate_vectors(w, dec.head_covariates[k], f"decoder.head_covariates.{k}", out)
        if w is not None:
            head_cov[k] = w
    return out, used, head_cov


# =========================================================================== scvi-tools internals
def cv_tensors(t: dict) -> dict:
    """A scvi-tools minibatch as the dict cellvae's modules read (``cellvae._data``'s keys)."""
    out = {
        "x": t["X"].float(),
        "batch": t["batch"].reshape(-1).long(),
        "labels": t["labels"].reshape(-1).long(),
    }
    if "extra_categorical_covs" in t:
        out["cat_covs"] = t["extra_categorical_covs"].long()
    if "extra_continuous_covs" in t:
        out["cont_covs"] = t["extra_continuous_covs"].float()
    if "proteins" in t:
        out["protein"] = t["proteins"].float()
    return out


@torch.no_grad()
def scvi_vae_point(model, idx, *, transform_batch=None, lib_point: str = "observed", bs=500):
    """scvi-tools' VAE decoded at the posterior mean of z (module internals), per cell.

    The posterior mean is ``qz.loc``, through the encoder's ``z_transformation`` (the softmax
    of a logistic normal, ``latent_distribution="ln"``: the point cellvae's getters decode).
    ``lib_point`` for a latent library: ``"lognormal_mean"`` decodes at ``log E[ℓ] = m + v/2``
    (the point cellvae's getters use), ``"mean"`` at ``m``. ``"tensors"``: the minibatches in
    cellvae's keys (:func:`cv_tensors`).
    """
    m = model.module
    out: dict[str, list] = {}
    dl = model._make_data_loader(adata=model.adata, indices=idx, batch_size=bs)
    for t in dl:
        inf = m.inference(**m._get_inference_input(t))
        gin = m._get_generative_input(t, inf)
        qz = inf["qz"]
        gin["z"] = m.z_encoder.z_transformation(qz.loc)
        if inf["ql"] is not None:
            ql = inf["ql"]
            gin["library"] = ql.loc + (ql.scale**2 / 2 if lib_point == "lognormal_mean" else 0)
        gen = m.generative(**gin, transform_batch=transform_batch)
        px = gen["px"]
        vals = {
            "qz_m": qz.loc,
            "qz_v": qz.scale**2,
            "z": gin["z"],
            "scale": px.scale,
            "mu": px.rate if m.gene_likelihood == "poisson" else px.mu,
            "rec": -px.log_prob(t["X"]).sum(-1),
            "library": gin["library"],
            "x": t["X"],
            "batch": t["batch"].reshape(-1),
        }
        if m.gene_likelihood in ("nb", "zinb"):
            vals["theta"] = px.theta.expand_as(px.mu)
        if m.gene_likelihood == "zinb":
            vals["zi_probs"] = px.zi_probs
        if inf["ql"] is not None:
            vals["ql_m"], vals["ql_v"] = inf["ql"].loc, inf["ql"].scale ** 2
        for k, v in vals.items():
            out.setdefault(k, []).append(v)
        for k, v in cv_tensors(t).items():
            out.setdefault("t_" + k, []).append(v)
    res = {k: torch.cat(v) for k, v in out.items()}
    res["tensors"] = {k[2:]: res.pop(k) for k in list(res) if k.startswith("t_")}
    return res


def batch_codes_match(scvi_model, cv_model) -> None:
    """The batch, label and categorical covariate codes of both tools name the same categories
    in the same order (else the weights' one-hot columns would be mapped to other categories)."""
    mgr, reg = scvi_model.adata_manager, cv_model.registry_
    pairs = [
        ("batch", mgr.get_state_registry("batch").categorical_mapping, reg.batch_categories),
        ("labels", mgr.get_state_registry("labels").categorical_mapping, reg.label_categories),
    ]
    if "extra_categorical_covs" in mgr.data_registry:
        cov = mgr.get_state_registry("extra_categorical_covs")
        for key, cats in zip(reg.categorical_covariate_keys, reg.categorical_covariate_categories):
            pairs.append((key, cov["mappings"][key], cats))
    for name, s_cats, c_cats in pairs:
        assert [str(c) for c in s_cats] == list(c_cats), (name, list(s_cats), c_cats)


# =========================================================================== SCVI
def softmax_mean_sd(qz_m, qz_v, n: int = 2048, chunk: int = 256, seed: int = SEED + 9):
    """Mean and standard deviation of softmax(u), u ~ N(qz_m, qz_v), per entry (``n`` draws)."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.zeros_like(qz_m, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for _ in range(n // chunk):
        eps = torch.randn((chunk, *qz_m.shape), generator=g)
        p = torch.softmax(qz_m + qz_v.sqrt() * eps, -1).double()
        s1 += p.sum(0)
        s2 += (p**2).sum(0)
    mean = s1 / n
    return mean, (s2 / n - mean**2).clamp_min(0).sqrt()


def paired_models(name: str, adata, epochs: int, setup: dict, kw: dict):
    """scvi-tools' model ``name`` trained on a copy of ``adata``, cellvae's (untrained) on
    another, both set up alike; with scvi-tools' state dict and a cellvae module to map it to."""
    import scvi

    import cellvae

    a_s, a_c = adata.copy(), adata.copy()
    sm = train_scvi_tools(getattr(scvi.model, name), a_s, epochs, setup, **kw)
    cv_cls = getattr(cellvae, name)
    cv_cls.setup_anndata(a_c, **setup)
    cv = cv_cls(a_c, **kw)
    batch_codes_match(sm, cv)
    S = {k: v.detach().clone() for k, v in sm.module.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        probe = cv._build_module()
    return a_s, a_c, sm, cv, S, probe


def library_prior_rows(model: str, cv, S: dict) -> None:
    """The latent library's prior, which each package computes from the data itself."""
    for name in ("library_log_means", "library_log_vars"):
        exact(
            model,
            f"library prior log-{name.rsplit('_', 1)[1]} (each package's own)",
            getattr(cv.registry_, name),
            S[name].reshape(-1),
            ref_name="scvi buffer",
        )


def run_scvi(
    name: str,
    adata,
    epochs: int,
    n_ll: int,
    n_mc: int,
    mc_cells: int,
    full: bool,
    setup: dict | None = None,
    **kw,
) -> None:
    """One SCVI variant: ``setup`` (default: the batch) goes to both tools' ``setup_anndata``,
    ``kw`` to both models."""

    setup = {"batch_key": "batch"} if setup is None else setup
    t0 = time.perf_counter()
    a_s, a_c, sm, cv, S, cmod_probe = paired_models("SCVI", adata, epochs, setup, kw)
    state, used = scvi_state_to_cellvae_vae(S, cmod_probe)
    adopt(cv, state)
    unused = sorted(set(S) - used)
    model = f"SCVI[{name}]"
    print(
        f"{model}: scvi-tools trained {epochs} epochs in {time.perf_counter() - t0:.1f}s; "
        f"{len(used)} scvi-tools tensors mapped, unused (no role in this configuration): "
        f"{sorted({k.split('.')[0] + '.' + k.split('.')[1] if '.' in k else k for k in unused})}",
        flush=True,
    )
    n = a_c.n_obs
    all_idx = np.arange(n)
    cmod = cv.module
    ln = kw.get("latent_distribution") == "ln"

    if "library_log_means" in state:  # the library prior each package computes from the data
        library_prior_rows(model, cv, S)

    # ---------------------------------------------------------------- latent posterior
    lib_point = "lognormal_mean"
    P = scvi_vae_point(sm, all_idx, lib_point=lib_point)
    with quiet():
        torch.manual_seed(SEED + 3)  # the logistic normal's mean is a Monte-Carlo estimate
        s_m = sm.get_latent_representation(give_mean=True)
        s_mu, s_var = sm.get_latent_representation(return_dist=True)
    c_m = cv.get_latent_representation(give_mean=True)
    c_mu, c_var = cv.get_latent_representation(return_dist=True)
    if ln:  # E[softmax(u)]: scvi-tools 5,000 random draws, cellvae 512 scrambled Sobol points
        exact(model, "latent mean (return_dist, before the softmax)", c_mu, s_mu)
        _, sd = softmax_mean_sd(P["qz_m"], P["qz_v"])
        against_se(
            model,
            "latent mean (give_mean): E[softmax(u)]",
            c_m,
            s_m,
            sd.numpy() * math.sqrt(1 / 5000 + 1 / 512),
            note="scvi-tools: 5,000 random draws; cellvae: 512 scrambled Sobol points (se "
            "bounded by 512 random draws')",
        )
    else:
        exact(model, "latent mean (give_mean)", c_m, s_m)
    exact(model, "latent variance (return_dist)", c_var, s_var)
    if not kw.get("use_observed_lib_size", True):
        with quiet():
            s_l = sm.get_latent_library_size(give_mean=True)
        exact(model, "latent library size (give_mean)", cv.get_latent_library_size(), s_l)

    # ---------------------------------------------------------------- decoded at the mean
    c_norm = cv.get_normalized_expression(library_size=LIB, return_numpy=True)
    exact(
        model,
        "normalized expr, n_samples=1 (at mean)",
        c_norm,
        P["scale"] * LIB,
        ref_name="scvi internals @ qz mean",
        note="z = softmax(qz mean) for both" if ln else "",
    )
    if full:
        with quiet():
            torch.manual_seed(SEED)
            s_norm1 = sm.get_normalized_expression(library_size=LIB, n_samples=1, return_numpy=True)
        exact(
            model,
            "normalized expr, n_samples=1, scvi public getter",
            c_norm,
            s_norm1,
            cause="S1",
            note="scvi-tools decodes ONE sample of z at n_samples=1; cellvae "
            "the posterior mean (by design)",
        )
    cats = list(cv.registry_.batch_categories)
    for tb in cats[1:2]:
        P_tb = scvi_vae_point(sm, all_idx, transform_batch=cats.index(tb), lib_point=lib_point)
        exact(
            model,
            f"normalized expr, transform_batch={tb!r}",
            cv.get_normalized_expression(library_size=LIB, transform_batch=tb, return_numpy=True),
            P_tb["scale"] * LIB,
            ref_name="scvi internals @ qz mean",
        )
    if len(cats) > 1 and full:
        acc = sum(
            scvi_vae_point(sm, all_idx, transform_batch=i, lib_point=lib_point)["scale"]
            for i in range(len(cats))
        ) / len(cats)
        exact(
            model,
            f"normalized expr, transform_batch={cats}",
            cv.get_normalized_expression(library_size=LIB, transform_batch=cats, return_numpy=True),
            acc * LIB,
            ref_name="scvi internals @ qz mean",
        )
    if full and n_mc:  # Monte-Carlo: both public getters with many samples
        sub = np.arange(mc_cells)
        with quiet():
            torch.manual_seed(SEED + 1)
            s_samp = sm.get_normalized_expression(
                indices=sub, library_size=LIB, n_samples=n_mc, return_mean=False
            )
        torch.manual_seed(SEED + 2)
        c_samp = cv.get_normalized_expression(
            indices=sub, library_size=LIB, n_samples=n_mc, return_mean=False
        )
        monte_carlo(
            model,
            f"normalized expr, n_samples={n_mc} (public getters)",
            list(c_samp),
            list(s_samp),
            per_entry=True,
            note=f"{mc_cells} cells x genes; per-entry mean over samples",
        )

    lp = cv.get_likelihood_parameters()
    exact(
        model,
        "likelihood params: mean",
        lp["mean"],
        P["mu"],
        ref_name="scvi internals @ qz mean",
        note="latent library decoded at log E[l] = m + v/2 by both" if "ql_m" in P else "",
    )
    if "theta" in P:
        exact(
            model,
            "likelihood params: dispersions",
            lp["dispersions"],
            P["theta"],
            ref_name="scvi internals @ qz mean"
            if kw.get("dispersion") == "gene-cell"
            else "scvi internals",
            note=f"dispersion={kw.get('dispersion', 'gene')!r}",
        )
    if "zi_probs" in P:
        exact(
            model,
            "likelihood params: dropout",
            lp["dropout"],
            P["zi_probs"],
            ref_name="scvi internals @ qz mean",
        )

    # ---------------------------------------------------------------- likelihood at fixed z
    with torch.no_grad():
        tensors = P["tensors"]  # the cells' batch, labels and covariates, as scvi-tools read them
        x = tensors["x"]
        cinf = cmod.inference(tensors)
        lib = cinf["library"] if cinf["ql_m"] is None else P["library"]
        gen = cmod.generative(P["z"], lib, tensors)
        rec_sum = -gen["px"].log_prob_sum(x)
        rec_elem = -gen["px"].log_prob(x).sum(-1)
    exact(
        model,
        "reconstruction at fixed z (log_prob_sum)",
        rec_sum,
        P["rec"],
        ref_name="scvi px.log_prob @ same z",
    )
    exact(
        model,
        "reconstruction at fixed z (elementwise)",
        rec_elem,
        P["rec"],
        ref_name="scvi px.log_prob @ same z",
    )

    # ---------------------------------------------------------------- sampled getters, same noise
    def aligned(seed, fn_scvi, fn_cv):
        with quiet():
            torch.manual_seed(seed)
            s_val = fn_scvi()
        torch.manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_()  # scvi-tools' DataLoader seed draw
        return fn_cv(), s_val

    bs = 128
    c_rec, s_rec = aligned(
        SEED,
        lambda: sm.get_reconstruction_error(batch_size=bs, return_mean=False),
        lambda: cv.get_reconstruction_error(batch_size=bs, return_mean=False),
    )
    same = exact(
        model,
        "get_reconstruction_error, same noise",
        c_rec["reconstruction_loss"],
        s_rec["reconstruction_loss"],
        note="same seed: both draw identical z",
    )
    c_elbo, s_elbo = aligned(
        SEED,
        lambda: sm.get_elbo(batch_size=bs, return_mean=False),
        lambda: cv.get_elbo(batch_size=bs, return_mean=False),
    )
    exact(
        model,
        "get_elbo, same noise",
        c_elbo,
        s_elbo,
        note="both return the ELBO per cell (higher is better)",
    )
    if not same:  # the noise was not shared after all: statistical comparison instead
        runs = [
            aligned(
                SEED + 10 + 2 * r + k,
                lambda: sm.get_reconstruction_error(batch_size=bs, return_mean=False),
                lambda: cv.get_reconstruction_error(batch_size=bs, return_mean=False),
            )
            for r in range(2)
            for k in range(1)
        ]
        monte_carlo(
            model,
            "get_reconstruction_error (independent noise)",
            [r[0]["reconstruction_loss"] for r in runs],
            [r[1]["reconstruction_loss"] for r in runs],
        )

    # ---------------------------------------------------------------- marginal log-likelihood
    if n_ll and ln:
        info(
            model,
            "get_marginal_ll",
            "skipped",
            "cellvae raises NotImplementedError for 'ln'; scvi-tools' VAE.marginal_ll evaluates "
            "the normal densities p(z), q(z|x) at softmax(u) instead of u (scvi/module/_vae.py, "
            "marginal_ll), which is not an importance weight of the logistic normal",
        )
    elif n_ll:
        sub = np.arange(64)
        c_runs, s_runs = [], []
        for r in range(2):
            with quiet():
                torch.manual_seed(SEED + 100 + r)
                s_runs.append(
                    sm.get_marginal_ll(
                        indices=sub, n_mc_samples=n_ll, return_mean=False, batch_size=64
                    )
                )
            torch.manual_seed(SEED + 200 + r)
            c_runs.append(
                cv.get_marginal_ll(indices=sub, n_mc_samples=n_ll, return_mean=False, batch_size=64)
            )
        monte_carlo(
            model,
            f"get_marginal_ll (64 cells, {n_ll} samples)",
            c_runs,
            s_runs,
            note="2 independent runs per tool",
        )
    print(f"{model}: done in {time.perf_counter() - t0:.1f}s", flush=True)


# =========================================================================== TOTALVI
def _scvi_totalvi_input(x, y, cont=None):
    """scvi-tools 1.4's TOTALVAE encoder input (scvi/module/_totalvae.py, _regular_inference):
    continuous covariates appended as they are (``encode_covariates=True``, its default)."""
    x_ = torch.log(1 + x / (1 + x.mean(1, keepdim=True)))
    y_ = torch.log(1 + y / (1 + y.mean(1, keepdim=True)))
    return torch.cat([x_, y_] + ([] if cont is None else [cont]), -1)


def _scvi_protein_mask(smod, n_batch: int, n_proteins: int) -> torch.Tensor:
    """scvi-tools' ``protein_batch_mask`` (a dict ``{str(batch code): bool per protein}``, None
    when every batch measured every protein) as a (batches, proteins) boolean tensor."""
    m = smod.protein_batch_mask
    if m is None:
        return torch.ones(n_batch, n_proteins, dtype=torch.bool)
    return torch.stack([torch.as_tensor(np.asarray(m[str(b)], dtype=bool)) for b in range(n_batch)])


@torch.no_grad()
def _scvi_totalvi_decode(smod, t, z, library_gene, code=None) -> dict:
    """scvi-tools' TOTALVAE decoder at a given z and gene library (counts), decoded as batch
    ``code`` (None: each cell's own): the gene scale and rate, and the protein terms at the
    background's log-normal mean ``exp(a + b^2/2)`` (deterministic; its sample is unused)."""
    gin = {
        "z": z,
        "library_gene": library_gene,
        "batch_index": t["batch"],
        "label": t["labels"],
        "cont_covs": t.get("extra_continuous_covs"),
        "cat_covs": t.get("extra_categorical_covs"),
    }
    g = smod.generative(**gin, transform_batch=code)
    px, py = g["px_"], g["py_"]
    back = torch.exp(py["back_alpha"] + py["back_beta"] ** 2 / 2)
    p_back = torch.sigmoid(py["mixing"])
    return {
        "scale": px["scale"],
        "rate": px["rate"],
        "foreground": 1 - p_back,
        "background": back,
        "protein": back * py["fore_scale"] * (1 - p_back),
    }


def _module_name(key: str) -> str:
    """A state-dict key's module (the part before ``.fc_layers``, ``.weight``, ``.bias``)."""
    return key.split(".fc_layers")[0].removesuffix(".weight").removesuffix(".bias")


def run_totalvi(
    name: str,
    adata,
    epochs: int,
    batch_key: str | None,
    full: bool,
    setup: dict | None = None,
    **kw,
) -> None:
    """One TOTALVI variant; ``setup``: further ``setup_anndata`` arguments (covariates) for both
    tools, ``kw``: both models' options."""

    from cellvae.distributions import NegativeBinomialMixture as CvMixture
    from cellvae.module._base import covariate_codes

    t0 = time.perf_counter()
    key = "protein_expression"
    setup = {"protein_expression_obsm_key": key, "batch_key": batch_key, **(setup or {})}
    a_s, a_c, sm, cv, S, probe = paired_models("TOTALVI", adata, epochs, setup, kw)
    state, used, head_cov = scvi_state_to_cellvae_totalvae(S, probe)
    adopt(cv, state)
    cmod, smod = cv.module, sm.module
    model = f"TOTALVI[{name}]"
    unused = sorted(set(S) - used)
    print(
        f"{model}: scvi-tools trained {epochs} epochs in {time.perf_counter() - t0:.1f}s; "
        f"unmapped scvi-tools tensors: {sorted({_module_name(k) for k in unused})}",
        flush=True,
    )
    eff = S["log_per_batch_efficiency"]
    info(
        model,
        "scvi log_per_batch_efficiency (no cellvae counterpart)",
        f"max |log eff| = {eff.abs().max():.3g}",
        "multiplies rate_back and rate_fore in scvi-tools' protein likelihood (finding T3)",
    )
    if head_cov:
        info(
            model,
            "scvi head weights on batch / covariate one-hots -> decoder.head_covariates",
            "max |W| " + ", ".join(f"{k}={v.abs().max():.3g}" for k, v in head_cov.items()),
            "mapped into cellvae's per-head covariate vectors (finding T4, fixed in session 36)",
        )
    zinb = cmod.gene_likelihood == "zinb"
    latent_lib = not cmod.use_observed_lib_size
    cats = list(cv.registry_.batch_categories)
    n_batch, n_prot = len(cats), cv.registry_.n_proteins

    # ---------------------------------------------------------------- missing proteins
    s_mask = _scvi_protein_mask(smod, n_batch, n_prot)
    c_mask = torch.as_tensor(np.asarray(cv.registry_.protein_batch_mask, dtype=bool))
    n_missing = int((~s_mask).sum())
    if n_missing or not c_mask.all():
        exact(
            model,
            f"protein_batch_mask: registry ({int((~c_mask).sum())} missing) vs scvi",
            c_mask.float(),
            s_mask.float(),
            ref_name="scvi protein_batch_mask",
        )
        exact(
            model,
            "protein_batch_mask: module buffer vs scvi",
            cmod.protein_batch_mask.float(),
            s_mask.float(),
            ref_name="scvi protein_batch_mask",
        )
        info(
            model,
            "adversarial batch classifier",
            f"cellvae {cmod.classifier is not None}, scvi {sm._use_adversarial_classifier}",
            "both switch it on when a batch lacks a protein; it enters training only (scvi-tools: "
            "in its training plan; cellvae's own initial weights kept here)",
        )
    if latent_lib:  # the library prior each package computes from the data
        library_prior_rows(model, cv, S)

    n = a_c.n_obs
    idx = np.arange(n)
    # ---------------------------------------------------------------- latent, public getters
    with quiet():
        s_mu, s_var = sm.get_latent_representation(return_dist=True)
    c_mu, c_var = cv.get_latent_representation(return_dist=True)
    exact(
        model,
        "latent mean (public getters)",
        c_mu,
        s_mu,
        cause="T1",
        note="encoder input: cellvae log1p(x), scvi log1p(x / (1 + mean x))",
    )
    exact(model, "latent variance (public getters)", c_var, s_var, cause="T1")
    if latent_lib:
        with quiet():
            s_l = sm.get_latent_library_size(give_mean=True)
        exact(
            model,
            "latent library size (public getters)",
            cv.get_latent_library_size(),
            s_l,
            cause="T1",
            note="both exp(m + v/2) of their own q(l)",
        )

    # ---------------------------------------------------------------- scvi internals at the mean
    dl = sm._make_data_loader(adata=sm.adata, indices=idx, batch_size=n)
    t = next(iter(dl))
    ct = cv_tensors(t)
    x, y, b = ct["x"], ct["protein"], ct["batch"]
    batch_mask = s_mask[b].float()  # (cells, proteins), as scvi-tools' loss builds it
    with torch.no_grad():
        inf = smod.inference(**smod._get_inference_input(t))
        gin = smod._get_generative_input(t, inf)
        z = inf["qz"].loc
        gin["z"] = z
        torch.manual_seed(SEED + 5)
        sgen = smod.generative(**gin)
        spx, spy = sgen["px_"], sgen["py_"]
        s_back_mean = torch.exp(spy["back_alpha"] + spy["back_beta"] ** 2 / 2)
        s_pback = torch.sigmoid(spy["mixing"])
        s_protein = s_back_mean * spy["fore_scale"] * (1 - s_pback)
        pmask = batch_mask if n_missing else None
        s_rec_gene, s_rec_prot_eff = smod.get_reconstruction_loss(
            x, y, spx, spy, pmask, sgen["per_batch_efficiency"]
        )
        _, s_rec_prot = smod.get_reconstruction_loss(x, y, spx, spy, pmask, None)
        _, s_rec_prot_all = smod.get_reconstruction_loss(x, y, spx, spy, None, None)
        # background KL: the plain Gaussian KL over the measured proteins, and scvi-tools 1.4's
        # kl_div_back_pro, which also holds the log-normal prior of the per-batch efficiency
        # and a 1e-3 Bernoulli penalty on the mixing (scvi/module/_totalvae.py, loss)
        s_kl_plain = (
            torch.distributions.kl_divergence(
                torch.distributions.Normal(spy["back_alpha"], spy["back_beta"]),
                inf["back_mean_prior"],
            )
            * batch_mask
        ).sum(-1)
        s_loss = smod.loss(t, inf, sgen)
        s_kl_full = s_loss.kl_local["kl_div_back_pro"]
        # the cellvae encoder fed scvi-tools' input transform: checks the weights mapping
        cq = cmod.encoder(_scvi_totalvi_input(x, y, ct.get("cont_covs")), *covariate_codes(ct))
    exact(
        model,
        "latent mean, cellvae encoder on scvi's input transform",
        cq[0],
        z,
        ref_name="scvi internals",
        note="isolates the weight mapping from T1",
    )
    exact(
        model,
        "latent variance, cellvae encoder on scvi's input transform",
        cq[1],
        inf["qz"].scale ** 2,
        ref_name="scvi internals",
    )
    if latent_lib:
        exact(
            model,
            "library posterior mean, cellvae encoder on scvi's input",
            cq[2],
            inf["ql"].loc,
            ref_name="scvi internals",
        )
        exact(
            model,
            "library posterior variance, cellvae encoder on scvi's input",
            cq[3],
            inf["ql"].scale ** 2,
            ref_name="scvi internals",
        )

    with torch.no_grad():
        cinf = cmod.inference(ct)
    if not latent_lib:
        exact(
            model,
            "gene library (observed)",
            cinf["library"],
            gin["library_gene"],
            ref_name="scvi internals",
        )
    library = gin["library_gene"]  # observed, or scvi-tools' sample of the latent library

    # ---------------------------------------------------------------- decoder at scvi's z
    # cellvae's decoder (T2, T4, T5 now its own) at scvi-tools' z and the same background noise
    with torch.no_grad():
        gm = cmod.generative(z, library, ct, sample_background=False)
        torch.manual_seed(SEED + 5)  # the same background noise as scvi-tools' decoder
        gs = cmod.generative(z, library, ct, sample_background=True)
        c_rec_gene = -gs["px"].log_prob_sum(x)
        c_rec_prot, c_kl_back = cmod.protein_terms(gs, y, b)
        # cellvae's whole loss at scvi-tools' posterior (its encoder on scvi's input) and z
        c_inf = {
            "z": z,
            "qz_m": cq[0],
            "qz_v": cq[1],
            "ql_m": cq[2],
            "ql_v": cq[3],
            "library": library,
            "kl_z": None,
        }
        c_loss = cmod.loss(ct, c_inf, gs)
    cpx, cpy = gm["px_"], gm["py_"]
    ref = "scvi internals @ same z"
    cov_note = "with the covariate vectors of each head (T4)" if head_cov else ""
    exact(
        model,
        "gene normalized expr x1e4 @ fixed z",
        cpx["scale"] * LIB,
        spx["scale"] * LIB,
        ref_name=ref,
        note=cov_note,
    )
    if latent_lib:
        exact(model, "gene rate @ fixed z, same library", cpx["rate"], spx["rate"], ref_name=ref)
    exact(
        model,
        "protein foreground prob @ fixed z",
        1 - torch.sigmoid(cpy["mixing"]),
        1 - s_pback,
        ref_name=ref,
    )
    exact(model, "protein fore_scale @ fixed z", cpy["fore_scale"], spy["fore_scale"], ref_name=ref)
    exact(model, "protein back_alpha @ fixed z", cpy["back_alpha"], spy["back_alpha"], ref_name=ref)
    exact(
        model,
        "protein back_beta @ fixed z",
        cpy["back_beta"],
        spy["back_beta"],
        ref_name=ref,
        note="both softplus(.) + 1e-8 (T2)",
    )
    exact(
        model,
        "protein background mean @ fixed z",
        cpy["rate_back"],
        s_back_mean,
        ref_name=ref + ", exp(a + b^2/2)",
    )
    exact(
        model,
        "protein normalized expr @ fixed z",
        cpy["rate_fore"] * (1 - torch.sigmoid(cpy["mixing"])),
        s_protein,
        ref_name=ref + ", background mean",
    )
    if zinb:
        exact(
            model,
            "gene dropout prob @ fixed z",
            torch.sigmoid(cpx["dropout"]),
            torch.sigmoid(spx["dropout"]),
            ref_name=ref,
            note="both heads read [h_mixing, z] (T5)",
        )
    exact(model, "gene reconstruction per cell @ fixed z", c_rec_gene, s_rec_gene, ref_name=ref)
    mask_note = f"{n_missing} (batch, protein) pairs masked by both" if n_missing else ""
    exact(
        model,
        "protein reconstruction @ fixed z, same bg noise",
        c_rec_prot,
        s_rec_prot,
        ref_name=ref + ", scvi loss without efficiency",
        note="; ".join(filter(None, ["scvi-tools' per-batch efficiency left out (T3)", mask_note])),
    )
    exact(
        model,
        "background KL per cell @ fixed z",
        c_kl_back,
        s_kl_plain,
        ref_name=ref + ", KL(q(log b) || prior) alone",
        note=mask_note,
    )
    s_kl_z = s_loss.kl_local["kl_div_z"]
    s_kl_l = s_loss.kl_local["kl_div_l_gene"]
    exact(
        model,
        "cellvae loss: reconstruction @ fixed z, same bg noise",
        c_loss.reconstruction,
        s_rec_gene + s_rec_prot,
        ref_name="scvi genes + proteins (no efficiency)",
        note=mask_note,
    )
    exact(
        model,
        "cellvae loss: KL terms @ scvi's posterior",
        c_loss.kl_local,
        s_kl_z + s_kl_plain + s_kl_l,
        ref_name="scvi kl_z + plain bg KL + kl_l",
        note="with the latent library's KL" if latent_lib else "",
    )

    with torch.no_grad():  # the mixture likelihood alone, both fed scvi-tools' decoder outputs
        c_mix = (
            -CvMixture(
                mu1=spy["rate_back"],
                mu2=spy["rate_fore"],
                theta1=spy["r"],
                mixture_logits=spy["mixing"],
            )
            .log_prob(y)
            .sum(-1)
        )
    exact(
        model,
        "protein mixture log-lik formula (same params)",
        c_mix,
        s_rec_prot_all,
        ref_name="scvi NegativeBinomialMixture",
    )
    exact(
        model,
        "protein rec: scvi loss without vs with efficiency",
        s_rec_prot,
        s_rec_prot_eff,
        ref_name="scvi loss with per-batch efficiency",
        cause="T3",
        note="both scvi-tools: the size of T3 at these weights",
    )
    exact(
        model,
        "background KL: plain vs scvi kl_div_back_pro",
        s_kl_plain,
        s_kl_full,
        ref_name="scvi loss (efficiency prior + mixing penalty)",
        cause="T3",
        note="both scvi-tools: the extra terms get_elbo counts",
    )

    # ---------------------------------------------------------------- getters over batches
    # cellvae's public getters (its own encoder and posterior means) against scvi-tools' decoder
    # at cellvae's posterior means: the getters' decoding and averaging, T1 left out
    if n_batch > 1 or n_missing:
        with torch.no_grad():
            zc = cmod.encoder.z_transformation(cinf["qz_m"])
            if latent_lib:
                libc = torch.exp((cinf["ql_m"] + cinf["ql_v"] / 2).clamp(max=15.0))
            else:
                libc = cinf["library"]
        ref_c = "scvi decoder @ cellvae's qz mean"
        dec = {code: _scvi_totalvi_decode(smod, t, zc, libc, code) for code in range(n_batch)}
        own = _scvi_totalvi_decode(smod, t, zc, libc, None)
        rna_own, prot_own = cv.get_normalized_expression(library_size=LIB, return_numpy=True)
        exact(model, "getter genes, own batch", rna_own, own["scale"] * LIB, ref_name=ref_c)
        exact(model, "getter proteins, own batch", prot_own, own["protein"], ref_name=ref_c)
        if latent_lib:
            rna_lat, _ = cv.get_normalized_expression(library_size="latent", return_numpy=True)
            exact(
                model,
                "getter genes, library_size='latent'",
                rna_lat,
                own["rate"],
                ref_name=ref_c + ", exp(m + v/2)",
            )
        tb = cats[-1]  # one batch (the one that lacks proteins, when one does)
        rna1, prot1 = cv.get_normalized_expression(
            library_size=LIB, transform_batch=tb, return_numpy=True
        )
        d1 = dec[n_batch - 1]
        exact(
            model, f"getter genes, transform_batch={tb!r}", rna1, d1["scale"] * LIB, ref_name=ref_c
        )
        exact(
            model,
            f"getter proteins, transform_batch={tb!r}",
            prot1,
            d1["protein"],
            ref_name=ref_c,
            note="proteins that batch lacks: decoded as if measured there (both)"
            if n_missing
            else "",
        )
        # the average over all batches: scvi-tools over every batch; cellvae, per protein, over
        # the batches that measured it (TOTALVI.get_normalized_expression's docstring)
        w = s_mask.float()  # (batches, proteins)
        w_sum = w.sum(0)

        def averages(k):  # per protein: the mean over all batches, over the measuring ones
            plain = sum(dec[c][k] for c in range(n_batch)) / n_batch
            masked = sum(dec[c][k] * w[c] for c in range(n_batch)) / w_sum.clamp_min(1)
            return plain, torch.where(w_sum > 0, masked, plain)

        rna_all, prot_all = cv.get_normalized_expression(
            library_size=LIB, transform_batch=cats, return_numpy=True
        )
        g_plain = sum(dec[c]["scale"] for c in range(n_batch)) / n_batch
        exact(
            model, f"getter genes, transform_batch={cats}", rna_all, g_plain * LIB, ref_name=ref_c
        )
        getters = {
            "proteins": (prot_all, "protein"),
            "foreground prob": (
                cv.get_protein_foreground_probability(transform_batch=cats, return_numpy=True),
                "foreground",
            ),
            "background mean": (
                cv.get_protein_background_mean(transform_batch=cats, return_numpy=True),
                "background",
            ),
        }
        for label, (c_val, k) in getters.items():
            plain, masked = averages(k)
            if n_missing:
                exact(
                    model,
                    f"getter {label}, transform_batch={cats}, measuring batches",
                    c_val,
                    masked,
                    ref_name=ref_c + ", mean over measuring batches",
                )
            exact(
                model,
                f"getter {label}, transform_batch={cats}, all batches",
                c_val,
                plain,
                ref_name=ref_c + ", mean over all batches (scvi-tools' rule)",
                cause="T8" if n_missing else "",
                note="cellvae averages each protein over the batches that measured it"
                if n_missing
                else "",
            )

    if n_batch > 1:  # transform_batch over several batches
        outs = {}
        for lib in (1, LIB):
            with quiet():
                torch.manual_seed(SEED + 7)  # the same z and background samples in both calls
                outs[lib] = sm.get_normalized_expression(
                    transform_batch=cats, library_size=lib, return_numpy=True
                )[0]
        exact(
            model,
            f"scvi genes: library_size=L vs L * library_size=1, {len(cats)} batches",
            outs[LIB],
            LIB * outs[1],
            ref_name="scvi-tools itself, same noise",
            cause="T7",
            note="scvi-tools multiplies the running sum by library_size per batch",
        )
        c1 = cv.get_normalized_expression(transform_batch=cats, library_size=1, return_numpy=True)[
            0
        ]
        cl = cv.get_normalized_expression(
            transform_batch=cats, library_size=LIB, return_numpy=True
        )[0]
        exact(
            model,
            f"cellvae genes: library_size=L vs L * library_size=1, {len(cats)} batches",
            cl,
            LIB * c1,
            ref_name="cellvae itself",
        )

    # ---------------------------------------------------------------- cellvae public getters
    if full:
        rna, prot = cv.get_normalized_expression(library_size=LIB, return_numpy=True)
        exact(
            model,
            "get_normalized_expression genes (public, end to end)",
            rna,
            spx["scale"] * LIB,
            ref_name="scvi internals @ qz mean",
            cause="T1",
        )
        exact(
            model,
            "get_normalized_expression proteins (public, end to end)",
            prot,
            s_protein,
            ref_name="scvi internals @ qz mean, bg mean",
            cause="T1",
        )
        exact(
            model,
            "get_protein_foreground_probability (public, end to end)",
            cv.get_protein_foreground_probability(return_numpy=True),
            1 - s_pback,
            ref_name="scvi internals @ qz mean",
            cause="T1",
        )
        exact(
            model,
            "get_protein_background_mean (public, end to end)",
            cv.get_protein_background_mean(return_numpy=True),
            s_back_mean,
            ref_name="scvi internals @ qz mean, bg mean",
            cause="T1",
            note="scvi-tools' own getter returns ONE background sample at a sampled z (T6)",
        )
    print(f"{model}: done in {time.perf_counter() - t0:.1f}s", flush=True)


# =========================================================================== main
def with_covariates(adata, seed: int = SEED):
    """``adata`` with synthetic covariates: ``donor`` (3 categories, at random) and two
    continuous columns (the standardised log library and Gaussian noise)."""
    import pandas as pd

    a = adata.copy()
    rng = np.random.default_rng(seed)
    a.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2", "d3"], a.n_obs))
    lib = np.log(np.asarray(a.X.sum(1), dtype=np.float64).ravel())
    a.obs["log_lib_z"] = ((lib - lib.mean()) / lib.std()).astype(np.float32)
    a.obs["noise"] = rng.normal(size=a.n_obs).astype(np.float32)
    return a


def scvi_variants(kang, ep_main: int, ep_var: int, n_ll: int, n_mc: int, extended: bool):
    run_scvi("zinb", kang, ep_main, n_ll, n_mc, 64, True)
    run_scvi("nb", kang, ep_var, n_ll, 0, 64, False, gene_likelihood="nb")
    run_scvi("poisson", kang, ep_var, n_ll, 0, 64, False, gene_likelihood="poisson")
    run_scvi("zinb, latent library", kang, ep_var, n_ll, 0, 64, True, use_observed_lib_size=False)

    # dispersions: per batch, per label (Kang's cell types), per cell. get_marginal_ll where the
    # option changes its tiled minibatches (batch, labels, covariates); elsewhere it is left out
    # from the default run to keep it short (--extended runs it everywhere)
    ll_x = n_ll if extended else 0
    labels = {"batch_key": "batch", "labels_key": "cell_type"}
    run_scvi("gene-batch", kang, ep_var, n_ll, 0, 64, True, dispersion="gene-batch")
    run_scvi("gene-label", kang, ep_var, n_ll, 0, 64, False, labels, dispersion="gene-label")
    run_scvi("gene-cell", kang, ep_var, ll_x, 0, 64, False, dispersion="gene-cell")
    # covariates (synthetic), in the decoder only, then in the encoders too
    cov = with_covariates(kang)
    covs = {
        "batch_key": "batch",
        "categorical_covariate_keys": ["donor"],
        "continuous_covariate_keys": ["log_lib_z", "noise"],
    }
    run_scvi("covariates", cov, ep_var, n_ll, n_mc, 64, True, covs)
    run_scvi("covariates, encode_covariates", cov, ep_var, ll_x, 0, 64, False, covs,
             encode_covariates=True)  # fmt: skip
    # depth: covariates injected into every layer (the default), then into the first only
    run_scvi("n_layers=2, covariates", cov, ep_var, ll_x, 0, 64, False, covs, n_layers=2)
    run_scvi("n_layers=2, covariates, no deep injection", cov, ep_var, ll_x, 0, 64, False, covs,
             n_layers=2, deeply_inject_covariates=False)  # fmt: skip
    # the entries of a cell share its z: 128 cells make the per-entry statistic less noisy
    run_scvi("ln", kang, ep_var, n_ll, n_mc, 128, True, latent_distribution="ln")
    if extended:  # everything at once
        run_scvi(
            "extended: all options",
            cov,
            ep_var,
            n_ll,
            0,
            64,
            True,
            {**covs, "labels_key": "cell_type"},
            n_layers=2,
            encode_covariates=True,
            deeply_inject_covariates=False,
            use_observed_lib_size=False,
            dispersion="gene-label",
            gene_likelihood="nb",
        )
        run_scvi(
            "extended: ln, gene-batch, latent library, encode_covariates",
            cov,
            ep_var,
            0,
            0,
            64,
            True,
            covs,
            latent_distribution="ln",
            dispersion="gene-batch",
            use_observed_lib_size=False,
            encode_covariates=True,
        )


def totalvi_variants(eccite, ep_main: int, ep_var: int, extended: bool):
    hp = {"use_observed_lib_size": True, "dropout_rate_decoder": 0.2}  # as bench_totalvi.py
    run_totalvi("nb", eccite, 2 * ep_main, None, True, **hp)
    run_totalvi("zinb", eccite, ep_var, None, False, gene_likelihood="zinb", **hp)
    two = eccite.copy()
    two.obs["batch2"] = np.where(np.arange(two.n_obs) % 2 == 0, "A", "B")
    run_totalvi("nb, 2 synthetic batches", two, ep_var, "batch2", False, **hp)

    # a categorical covariate besides the batch
    cov = with_covariates(two)
    run_totalvi("nb, 2 batches, categorical covariate", cov, ep_var, "batch2", False,
                {"categorical_covariate_keys": ["donor"]}, **hp)  # fmt: skip
    # proteins missing from one batch: 6 proteins zeroed in batch B; both tools mask them
    miss = two.copy()
    prot = miss.obsm["protein_expression"].copy()
    lost = list(prot.columns[[0, 5, 11, 20, 31, 42]])
    prot.loc[miss.obs["batch2"].to_numpy() == "B", lost] = 0
    miss.obsm["protein_expression"] = prot
    run_totalvi("nb, 2 batches, 6 proteins missing in B", miss, ep_var, "batch2", False, **hp)
    # the latent gene library
    lat = {**hp, "use_observed_lib_size": False}
    run_totalvi("nb, 2 batches, latent library", two, ep_var, "batch2", False, **lat)
    if extended:
        run_totalvi("extended: categorical + continuous covariates", cov, ep_var, "batch2", False,
                    {"categorical_covariate_keys": ["donor"],
                     "continuous_covariate_keys": ["log_lib_z", "noise"]}, **hp)  # fmt: skip
        miss_cov = with_covariates(miss)
        run_totalvi(
            "extended: zinb, proteins missing, covariate, latent library",
            miss_cov,
            ep_var,
            "batch2",
            True,
            {"categorical_covariate_keys": ["donor"]},
            gene_likelihood="zinb",
            **lat,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs / samples (smoke run)")
    p.add_argument(
        "--extended",
        action="store_true",
        help="also the slower variants that combine several options",
    )
    p.add_argument(
        "--only",
        choices=("scvi", "totalvi"),
        help="run one model's variants only (development)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "parity.csv")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    quick = a.quick
    ep_main, ep_var = (2, 1) if quick else (10, 5)
    n_ll = 50 if quick else 200
    n_mc = 30 if quick else 100

    kang = kang_hvg()
    eccite = eccite_hvg()
    import scvi

    import cellvae

    print(
        f"cellvae {cellvae.__version__}, scvi-tools {scvi.__version__}, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; Kang {kang.shape}, "
        f"ECCITE {eccite.shape} + {eccite.obsm['protein_expression'].shape[1]} proteins",
        flush=True,
    )

    if a.only != "totalvi":
        scvi_variants(kang, ep_main, ep_var, n_ll, n_mc, a.extended)
    if a.only != "scvi":
        totalvi_variants(eccite, ep_main, ep_var, a.extended)

    cols = [
        ("model", "model"),
        ("quantity", "quantity"),
        ("max_abs", "max abs diff"),
        ("max_rel", "max rel diff"),
        ("worst_over_tol", "diff/tol"),
        ("z", "MC z|rms z"),
        ("verdict", "verdict"),
    ]
    print()
    print_table(ROWS, cols)
    write_csv(
        a.out,
        ROWS,
        [
            "model",
            "quantity",
            "n",
            "reference",
            "max_abs",
            "max_rel",
            "worst_over_tol",
            "max_ref",
            "mean_diff",
            "mc_se",
            "z",
            "stat",
            "verdict",
            "cause",
            "note",
        ],
    )
    print(f"\nwall time {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

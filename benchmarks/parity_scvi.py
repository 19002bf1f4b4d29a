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

    .venv/bin/python benchmarks/parity_scvi.py            # ~2 min on 1 thread
    .venv/bin/python benchmarks/parity_scvi.py --quick    # fewer epochs and samples (~1 min)

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
    cv_model.module_.load_state_dict(state, strict=True)
    cv_model.module_.eval()
    cv_model.is_trained_ = True


def scvi_state_to_cellvae_vae(S: dict, cmod) -> tuple[dict, set]:
    out, used = {}, set()
    out["px_r"] = S["px_r"] if cmod.dispersion != "gene-batch" else S["px_r"].T
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
    out["px_r"], out["py_r"] = S["px_r"], S["py_r"]
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
@torch.no_grad()
def scvi_vae_point(model, idx, *, transform_batch=None, lib_point: str = "observed", bs=500):
    """scvi-tools' VAE decoded at the posterior mean of z (module internals), per cell.

    ``lib_point`` for a latent library: ``"lognormal_mean"`` decodes at ``log E[ℓ] = m + v/2``
    (the point cellvae's getters use), ``"mean"`` at ``m``.
    """
    m = model.module
    out: dict[str, list] = {}
    dl = model._make_data_loader(adata=model.adata, indices=idx, batch_size=bs)
    for t in dl:
        inf = m.inference(**m._get_inference_input(t))
        gin = m._get_generative_input(t, inf)
        qz = inf["qz"]
        gin["z"] = qz.loc
        if inf["ql"] is not None:
            ql = inf["ql"]
            gin["library"] = ql.loc + (ql.scale**2 / 2 if lib_point == "lognormal_mean" else 0)
        gen = m.generative(**gin, transform_batch=transform_batch)
        px = gen["px"]
        vals = {
            "qz_m": qz.loc,
            "qz_v": qz.scale**2,
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
    return {k: torch.cat(v) for k, v in out.items()}


def batch_codes_match(scvi_model, cv_model) -> None:
    mapping = list(scvi_model.adata_manager.get_state_registry("batch").categorical_mapping)
    assert [str(c) for c in mapping] == list(cv_model.registry_.batch_categories), (
        mapping,
        cv_model.registry_.batch_categories,
    )


# =========================================================================== SCVI
def run_scvi(
    name: str, adata, epochs: int, n_ll: int, n_mc: int, mc_cells: int, full: bool, **kw
) -> None:
    import scvi

    import cellvae

    t0 = time.perf_counter()
    a_s, a_c = adata.copy(), adata.copy()
    sm = train_scvi_tools(scvi.model.SCVI, a_s, epochs, {"batch_key": "batch"}, **kw)
    cellvae.SCVI.setup_anndata(a_c, batch_key="batch")
    cv = cellvae.SCVI(a_c, **kw)
    batch_codes_match(sm, cv)
    S = {k: v.detach().clone() for k, v in sm.module.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        cmod_probe = cv._build_module()
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

    if "library_log_means" in state:  # the library prior each package computes from the data
        exact(
            model,
            "library prior log-means (each package's own)",
            cv.registry_.library_log_means,
            S["library_log_means"].reshape(-1),
            ref_name="scvi buffer",
        )
        exact(
            model,
            "library prior log-vars (each package's own)",
            cv.registry_.library_log_vars,
            S["library_log_vars"].reshape(-1),
            ref_name="scvi buffer",
        )

    # ---------------------------------------------------------------- latent posterior
    with quiet():
        s_m = sm.get_latent_representation(give_mean=True)
        s_mu, s_var = sm.get_latent_representation(return_dist=True)
    c_m = cv.get_latent_representation(give_mean=True)
    c_mu, c_var = cv.get_latent_representation(return_dist=True)
    exact(model, "latent mean (give_mean)", c_m, s_m)
    exact(model, "latent variance (return_dist)", c_var, s_var)
    if not kw.get("use_observed_lib_size", True):
        with quiet():
            s_l = sm.get_latent_library_size(give_mean=True)
        exact(model, "latent library size (give_mean)", cv.get_latent_library_size(), s_l)

    # ---------------------------------------------------------------- decoded at the mean
    lib_point = "lognormal_mean"
    P = scvi_vae_point(sm, all_idx, lib_point=lib_point)
    c_norm = cv.get_normalized_expression(library_size=LIB, return_numpy=True)
    exact(
        model,
        "normalized expr, n_samples=1 (at mean)",
        c_norm,
        P["scale"] * LIB,
        ref_name="scvi internals @ qz mean",
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
            ref_name="scvi internals",
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
        x = P["x"].float()
        tensors = {"x": x, "batch": P["batch"].long(), "labels": torch.zeros(n, dtype=torch.long)}
        cinf = cmod.inference(tensors)
        lib = cinf["library"] if cinf["ql_m"] is None else P["library"]
        gen = cmod.generative(P["qz_m"], lib, tensors)
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
    if n_ll:
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
def _scvi_totalvi_input(x, y):
    """scvi-tools 1.4's TOTALVAE encoder input (scvi/module/_totalvae.py, _regular_inference)."""
    x_ = torch.log(1 + x / (1 + x.mean(1, keepdim=True)))
    y_ = torch.log(1 + y / (1 + y.mean(1, keepdim=True)))
    return torch.cat([x_, y_], -1)


def run_totalvi(name: str, adata, epochs: int, batch_key: str | None, full: bool, **kw) -> None:
    import scvi

    import cellvae
    from cellvae.distributions import NegativeBinomialMixture as CvMixture

    t0 = time.perf_counter()
    key = "protein_expression"
    a_s, a_c = adata.copy(), adata.copy()
    sm = train_scvi_tools(
        scvi.model.TOTALVI,
        a_s,
        epochs,
        {"protein_expression_obsm_key": key, "batch_key": batch_key},
        **kw,
    )
    cellvae.TOTALVI.setup_anndata(a_c, protein_expression_obsm_key=key, batch_key=batch_key)
    cv = cellvae.TOTALVI(a_c, **kw)
    batch_codes_match(sm, cv)
    S = {k: v.detach().clone() for k, v in sm.module.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        probe = cv._build_module()
    state, used, head_cov = scvi_state_to_cellvae_totalvae(S, probe)
    adopt(cv, state)
    cmod, smod = cv.module, sm.module
    model = f"TOTALVI[{name}]"
    unused = sorted(set(S) - used)
    print(
        f"{model}: scvi-tools trained {epochs} epochs in {time.perf_counter() - t0:.1f}s; "
        f"unmapped scvi-tools tensors: {unused}",
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
            "scvi head weights on batch one-hots -> decoder.head_covariates",
            "max |W| " + ", ".join(f"{k}={v.abs().max():.3g}" for k, v in head_cov.items()),
            "mapped into cellvae's per-head covariate vectors (finding T4, fixed in session 36)",
        )
    zinb = cmod.gene_likelihood == "zinb"

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

    # ---------------------------------------------------------------- scvi internals at the mean
    dl = sm._make_data_loader(adata=sm.adata, indices=idx, batch_size=n)
    t = next(iter(dl))
    x, y, b = t["X"].float(), t["proteins"].float(), t["batch"].reshape(-1).long()
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
        s_rec_gene, s_rec_prot_eff = smod.get_reconstruction_loss(
            x, y, spx, spy, None, sgen["per_batch_efficiency"]
        )
        _, s_rec_prot = smod.get_reconstruction_loss(x, y, spx, spy, None, None)
        # background KL: the plain Gaussian KL, and scvi-tools 1.4's kl_div_back_pro, which also
        # holds the log-normal prior of the per-batch efficiency and a 1e-3 Bernoulli penalty on
        # the mixing (scvi/module/_totalvae.py, loss)
        s_kl_plain = torch.distributions.kl_divergence(
            torch.distributions.Normal(spy["back_alpha"], spy["back_beta"]), inf["back_mean_prior"]
        ).sum(-1)
        s_kl_full = smod.loss(t, inf, sgen).kl_local["kl_div_back_pro"]
        # the cellvae encoder fed scvi-tools' input transform: checks the weights mapping
        cq = cmod.encoder(_scvi_totalvi_input(x, y), b)
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

    ct = {"x": x, "protein": y, "batch": b, "labels": torch.zeros(n, dtype=torch.long)}
    with torch.no_grad():
        cinf = cmod.inference(ct)
    exact(
        model,
        "gene library (observed)",
        cinf["library"],
        gin["library_gene"],
        ref_name="scvi internals",
    )

    # ---------------------------------------------------------------- decoder at scvi's z
    # cellvae's decoder (T2, T4, T5 now its own) at scvi-tools' z and the same background noise
    with torch.no_grad():
        gm = cmod.generative(z, cinf["library"], ct, sample_background=False)
        torch.manual_seed(SEED + 5)  # the same background noise as scvi-tools' decoder
        gs = cmod.generative(z, cinf["library"], ct, sample_background=True)
        c_rec_gene = -gs["px"].log_prob_sum(x)
        c_rec_prot, c_kl_back = cmod.protein_terms(gs, y, b)
    cpx, cpy = gm["px_"], gm["py_"]
    ref = "scvi internals @ same z"
    cov_note = "with the batch vectors of each head (T4)" if head_cov else ""
    exact(
        model,
        "gene normalized expr x1e4 @ fixed z",
        cpx["scale"] * LIB,
        spx["scale"] * LIB,
        ref_name=ref,
        note=cov_note,
    )
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
    exact(
        model,
        "protein reconstruction @ fixed z, same bg noise",
        c_rec_prot,
        s_rec_prot,
        ref_name=ref + ", scvi loss without efficiency",
        note="scvi-tools' per-batch efficiency left out (T3)",
    )
    exact(
        model,
        "background KL per cell @ fixed z",
        c_kl_back,
        s_kl_plain,
        ref_name=ref + ", KL(q(log b) || prior) alone",
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
        s_rec_prot,
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
    if len(cv.registry_.batch_categories) > 1:  # transform_batch over several batches
        cats = list(cv.registry_.batch_categories)
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
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs / samples (smoke run)")
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

    run_scvi("zinb", kang, ep_main, n_ll, n_mc, 64, True)
    run_scvi("nb", kang, ep_var, n_ll, 0, 64, False, gene_likelihood="nb")
    run_scvi("poisson", kang, ep_var, n_ll, 0, 64, False, gene_likelihood="poisson")
    run_scvi("zinb, latent library", kang, ep_var, n_ll, 0, 64, True, use_observed_lib_size=False)

    hp = {"use_observed_lib_size": True, "dropout_rate_decoder": 0.2}  # as bench_totalvi.py
    run_totalvi("nb", eccite, 2 * ep_main, None, True, **hp)
    run_totalvi("zinb", eccite, ep_var, None, False, gene_likelihood="zinb", **hp)
    two = eccite.copy()
    two.obs["batch2"] = np.where(np.arange(two.n_obs) % 2 == 0, "A", "B")
    run_totalvi("nb, 2 synthetic batches", two, ep_var, "batch2", False, **hp)

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

"""The totalVI variational autoencoder for RNA + protein (Gayoso et al., Nature Methods 2021).

Pure torch. Read top to bottom: ``inference`` encodes ``[log1p(x), log1p(y)]`` into q(z) and the
gene library q(ℓ); ``generative`` decodes z into the gene likelihood and the protein
background / foreground mixture; ``loss`` adds the reconstruction and KL terms. Proteins that a
batch did not measure are masked out of the protein terms with ``protein_batch_mask[batch]``:
one gather and one multiply per step, no Python loop over batches.

An optional adversarial batch classifier on z works with the single optimiser of
:mod:`cellvae.train`; see :class:`TOTALVAE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _kernels
from .._sparse import hstack, log1p, row_sums
from ..distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    ZeroInflatedNegativeBinomial,
    _wants_grad,
)
from ..nn import DecoderTOTALVI, EncoderTOTALVI, reparameterize
from ._base import (
    LossOutput,
    check_choice,
    check_flags,
    covariate_codes,
    decoder_input,
    kl_normal,
    kl_normal_elementwise,
    latent_kl,
    norm_places,
    rows_of,
)
from ._totalvae_step import fused_training_step

GeneDispersion = Literal["gene", "gene-batch", "gene-label"]
ProteinDispersion = Literal["protein", "protein-batch", "protein-label"]

__all__ = ["TOTALVAE"]


class _ProteinTerms(torch.autograd.Function):
    """:meth:`TOTALVAE.protein_terms` by the compiled kernels (:mod:`cellvae._kernels`).

    Inputs: ``mu1, mu2, theta, pi, alpha, beta, prior_m, prior_ls`` (differentiable), then
    ``y, codes, mask, eps, with_grad``; outputs ``rec`` and ``kl`` per cell.
    """

    @staticmethod
    def forward(ctx, mu1, mu2, theta, pi, alpha, beta, prior_m, prior_ls, y, codes, mask, eps,
                with_grad):  # fmt: skip
        rec, kl, *grads = _kernels.protein_terms(
            mu1, mu2, theta, pi, y, alpha, beta, codes, mask, prior_m, prior_ls, eps, with_grad
        )
        if with_grad:
            ctx.save_for_backward(codes, *grads)
            ctx.n_codes = mask.shape[0]
            ctx.theta_per_entry = theta.dim() == 2
        return rec, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rec, grad_kl):
        codes, *grads = ctx.saved_tensors
        d_mu1, d_mu2, d_pi, d_a, d_b, d_theta, d_pm, d_pls = _kernels.protein_terms_backward(
            grad_rec, grad_kl, codes, ctx.n_codes, grads, ctx.theta_per_entry
        )
        return d_mu1, d_mu2, d_theta, d_pi, d_a, d_b, d_pm, d_pls, None, None, None, None, None


class TOTALVAE(nn.Module):
    """Joint RNA and protein variational autoencoder with a protein background model.

    Generative model per cell ``n`` (batch ``b``): ``z ~ N(0, I)`` (or logistic normal),
    gene library ``ℓ ~ LogNormal(m_b, v_b)``; genes ``x_g ~ NB(ℓ ρ_g(z, b), θ_g)`` (or ZINB);
    protein background ``log β_t ~ N(α_t(z, b), σ_t(z, b))`` with prior
    ``N(prior_mean[t, b], exp(prior_log_scale[t, b]))``; protein counts
    ``y_t ~ π_t NB(β_t, φ_t) + (1 − π_t) NB(β_t · s_t(z, b), φ_t)`` with ``s_t ≥ 1``.

    Loss per cell (mean over the minibatch)::

        rec_genes + rec_proteins + kl_weight · (kl_z + kl_background) + kl_library

    The protein reconstruction is not scaled by the KL warm-up, as in the published loss.
    Proteins that a cell's batch did not measure (``protein_batch_mask[b, t] == False``) are
    dropped from ``rec_proteins`` and ``kl_background``.

    Adversarial batch classifier (``adversarial_classifier=True``): a small classifier
    predicts the batch from z. With one optimiser, two terms are added to the loss:
    ``CE(classifier(z.detach()), batch)`` trains the classifier only, and
    ``adversarial_weight · CE(classifier_frozen(z), uniform)`` trains the encoder only (the
    classifier's parameters are detached there) to make z uninformative about the batch, i.e.
    to push the classifier's prediction towards the uniform distribution over batches. Unlike
    a gradient-reversal layer this objective is bounded below, so it cannot diverge.

    Parameters
    ----------
    n_input_genes, n_input_proteins
        Number of genes and proteins.
    n_batch, n_labels
        Number of batches and labels (1 when not registered).
    n_hidden, n_latent
        Width of the hidden layers and size of the latent space.
    n_layers_encoder, n_layers_decoder
        Depth of the encoder and of each decoder stack.
    n_continuous_cov
        Number of continuous covariates (concatenated to the encoder and decoder inputs).
    n_cats_per_cov
        Categories of each extra categorical covariate (injected like the batch).
    dropout_rate_encoder, dropout_rate_decoder
        Dropout in the encoder and the decoder.
    gene_dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_likelihood
        ``"nb"`` or ``"zinb"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    use_observed_lib_size
        Use the observed gene library instead of the latent one (the module's default:
        latent; :class:`cellvae.TOTALVI`'s, as scvi-tools 1.4's: observed).
    use_size_factor_key
        Use the ``"size_factor"`` tensor as the gene library (softplus gene scale).
    library_log_means, library_log_vars
        Per-batch mean and variance of the log gene library (prior of the latent library).
    protein_background_prior_mean, protein_background_prior_scale
        Initial prior of ``log β``, arrays of shape ``(n_proteins, n_batch)``; default 0 and 1.
    protein_batch_mask
        ``(n_batch, n_proteins)`` booleans, True where the batch measured the protein; default
        all True.
    use_batch_norm, use_layer_norm
        Where to normalise: ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"``
        (scvi-tools' names; True and False mean both and none).
    adversarial_classifier
        Add the adversarial batch classifier on z (only with more than one batch).
    adversarial_weight
        Weight of the encoder's fooling term.

    Examples
    --------
    >>> import torch
    >>> module = TOTALVAE(
    ...     30, 5, n_batch=2, n_latent=4, library_log_means=[4.0, 4.0], library_log_vars=[0.5, 0.5]
    ... )
    >>> x = torch.poisson(torch.full((16, 30), 2.0))
    >>> y = torch.poisson(torch.full((16, 5), 20.0))
    >>> out = module({"x": x, "protein": y, "batch": torch.randint(2, (16,))})
    >>> out.reconstruction.shape, out.extra["reconstruction_protein"].shape
    (torch.Size([16]), torch.Size([16]))
    """

    def __init__(
        self,
        n_input_genes: int,
        n_input_proteins: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_hidden: int = 256,
        n_latent: int = 20,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        dropout_rate_encoder: float = 0.2,
        dropout_rate_decoder: float = 0.0,
        gene_dispersion: GeneDispersion = "gene",
        protein_dispersion: ProteinDispersion = "protein",
        gene_likelihood: Literal["nb", "zinb"] = "nb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        use_observed_lib_size: bool = False,
        use_size_factor_key: bool = False,
        library_log_means: Sequence[float] | None = None,
        library_log_vars: Sequence[float] | None = None,
        protein_background_prior_mean=None,
        protein_background_prior_scale=None,
        protein_batch_mask=None,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] | bool = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] | bool = "none",
        adversarial_classifier: bool = False,
        adversarial_weight: float = 1.0,
    ):
        super().__init__()
        self.check_options(
            gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution
        )
        check_flags(
            use_observed_lib_size=use_observed_lib_size,
            use_size_factor_key=use_size_factor_key,
            adversarial_classifier=adversarial_classifier,
        )
        bn_enc, bn_dec = norm_places("use_batch_norm", use_batch_norm)
        ln_enc, ln_dec = norm_places("use_layer_norm", use_layer_norm)
        self.n_input_genes, self.n_input_proteins = n_input_genes, n_input_proteins
        self.n_batch, self.n_labels, self.n_latent = n_batch, n_labels, n_latent
        self.gene_dispersion = gene_dispersion
        self.protein_dispersion = protein_dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.use_size_factor_key = use_size_factor_key
        self.use_observed_lib_size = use_size_factor_key or use_observed_lib_size
        self.n_continuous_cov = n_continuous_cov
        self.adversarial_weight = adversarial_weight

        # gene and protein inverse dispersions (log scale)
        rows = {"gene": (), "gene-batch": (n_batch,), "gene-label": (n_labels,)}
        self.px_r = nn.Parameter(torch.randn(*rows[gene_dispersion], n_input_genes))
        rows = {"protein": (), "protein-batch": (n_batch,), "protein-label": (n_labels,)}
        self.py_r = nn.Parameter(2 * torch.rand(*rows[protein_dispersion], n_input_proteins))

        # priors: latent gene library per batch, protein background per protein and batch
        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("A latent library needs library_log_means and library_log_vars.")
            self.register_buffer(
                "library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32)
            )
            self.register_buffer(
                "library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32)
            )
        shape = (n_input_proteins, n_batch)
        mean = torch.zeros(shape)
        if protein_background_prior_mean is not None:
            mean = torch.as_tensor(protein_background_prior_mean, dtype=torch.float32).reshape(
                shape
            )
        scale = torch.ones(shape)
        if protein_background_prior_scale is not None:
            scale = torch.as_tensor(protein_background_prior_scale, dtype=torch.float32)
            scale = scale.reshape(shape).clamp_min(1e-3)
        self.prior_mean = nn.Parameter(mean.clone())
        self.prior_log_scale = nn.Parameter(torch.log(scale))
        mask = torch.ones(n_batch, n_input_proteins, dtype=torch.bool)
        if protein_batch_mask is not None and len(protein_batch_mask):
            mask = torch.as_tensor(protein_batch_mask, dtype=torch.bool).reshape(mask.shape)
        self.register_buffer("protein_batch_mask", mask)

        cat_list = [n_batch, *(n_cats_per_cov or [])]
        self.encoder = EncoderTOTALVI(
            n_input_genes + n_input_proteins + n_continuous_cov,
            n_latent,
            n_cat_list=cat_list,
            n_layers=n_layers_encoder,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate_encoder,
            distribution=latent_distribution,
            use_batch_norm=bn_enc,
            use_layer_norm=ln_enc,
            latent_library=not self.use_observed_lib_size,
        )
        self.decoder = DecoderTOTALVI(
            n_latent + n_continuous_cov,
            n_input_genes,
            n_input_proteins,
            n_cat_list=cat_list,
            n_layers=n_layers_decoder,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate_decoder,
            use_batch_norm=bn_dec,
            use_layer_norm=ln_dec,
            scale_activation="softplus" if use_size_factor_key else "softmax",
            zero_inflation=gene_likelihood == "zinb",
        )
        if protein_background_prior_mean is not None:
            # start the background near its prior: early steps then fit the foreground and the
            # mixing instead of first pulling every background rate towards the prior
            with torch.no_grad():
                present = mask.T.float()
                n_present = present.sum(1).clamp_min(1)
                self.decoder.py_back_alpha.bias.copy_((mean * present).sum(1) / n_present)
                # σ = softplus(bias): its inverse log(e^s - 1) = s + log(1 - e^-s) (no overflow)
                inv_scale = scale + torch.log(-torch.expm1(-scale))
                self.decoder.py_back_beta.bias.copy_((inv_scale * present).sum(1) / n_present)
        self.classifier = None
        if adversarial_classifier and n_batch > 1:
            self.classifier = nn.Sequential(
                nn.Linear(n_latent, 32),
                nn.ReLU(),
                nn.Linear(32, 32),
                nn.ReLU(),
                nn.Linear(32, n_batch),
            )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def check_options(
        gene_dispersion: str,
        protein_dispersion: str,
        gene_likelihood: str,
        latent_distribution: str,
    ) -> None:
        """Raise a ValueError naming the allowed values of a bad option."""
        for name, value, options in (
            ("gene_dispersion", gene_dispersion, ("gene", "gene-batch", "gene-label")),
            (
                "protein_dispersion",
                protein_dispersion,
                ("protein", "protein-batch", "protein-label"),
            ),
            ("gene_likelihood", gene_likelihood, ("nb", "zinb")),
            ("latent_distribution", latent_distribution, ("normal", "ln")),
        ):
            check_choice(name, value, options)

    @staticmethod
    def _by_code(param: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """A per-feature parameter, or its row per cell when it has one row per category."""
        return param if param.dim() == 1 else rows_of(param, codes)

    # ------------------------------------------------------------------ the model
    def inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict:
        """Encode a minibatch: q(z | x, y) and the gene library (latent, observed or given).

        Returns a dict with ``z`` (transformed sample), ``untran_z``, ``qz_m``, ``qz_v``,
        ``ql_m`` / ``ql_v`` (None without a latent library) and ``library`` (count scale,
        ``(..., cells, 1)``). With ``n_samples > 1`` the samples get a leading axis.
        """
        x, y = tensors["x"], tensors["protein"]
        dense = torch.log1p(y)
        if "cont_covs" in tensors:
            dense = torch.cat([dense, tensors["cont_covs"]], dim=-1)
        data = hstack(log1p(x), dense)  # a CSR x stays sparse: the first layers read its entries
        encoded = self.encoder.forward_kl(data, *covariate_codes(tensors))
        qz_m, qz_v, ql_m, ql_v, latent, untran, kl_z = encoded
        z, untran_z, library = latent["z"], untran["z"], latent["l"]
        if self.use_size_factor_key:
            library = tensors["size_factor"].unsqueeze(-1)
        elif self.use_observed_lib_size:  # the encoder has no library stack: ql_m, ql_v are None
            library = row_sums(x)
        if n_samples > 1:
            untran_z = reparameterize(qz_m, qz_v, n_samples)
            z = self.encoder.z_transformation(untran_z)
            if ql_m is not None:
                log_l = reparameterize(ql_m, ql_v, n_samples)
                library = torch.exp(log_l.clamp(max=15.0))
            else:
                library = library.expand(n_samples, *library.shape)
        return {
            "z": z,
            "untran_z": untran_z,
            "qz_m": qz_m,
            "qz_v": qz_v,
            "ql_m": ql_m,
            "ql_v": ql_v,
            "library": library,
            "kl_z": None if n_samples > 1 else kl_z,  # KL(q(z) ‖ N(0, I)) when the encoder gave it
        }

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        *,
        batch: torch.Tensor | None = None,
        sample_background: bool = True,
        lazy_mean: bool = False,
    ) -> dict:
        """Decode z into ``px`` (genes) and ``py`` (protein mixture) distributions.

        ``batch`` overrides the cells' batch (decode as if from that batch);
        ``sample_background=False`` uses the mean of the background instead of a sample.
        Returns ``px``, ``py`` (distributions), ``px_`` and ``py_`` (the decoder outputs) and
        ``log_pro_back_mean``. With ``lazy_mean`` (the training loss) and a softmax decoder,
        ``px`` is built from the decoder's logits and the library, ``px_["scale"]`` and
        ``px_["rate"]`` are None, and ``px.log_prob_sum`` evaluates the softmax inside the
        likelihood kernel (see :meth:`cellvae.module.VAE.generative`).
        """
        lazy = lazy_mean and z.dim() == 2 and self.decoder.scale_activation == "softmax"
        dec_in, cats, unflat = decoder_input(z, tensors, batch)
        if z.dim() == 3:
            library = library.reshape(-1, 1)
        px_, py_, log_back = self.decoder(
            dec_in,
            library,
            *cats,
            sample_background=sample_background,
            compute_dropout=self.gene_likelihood == "zinb",
            scale_logits=lazy,
        )
        px_ = {k: unflat(v) for k, v in px_.items()}
        py_ = {k: unflat(v) for k, v in py_.items()}
        log_back = unflat(log_back)
        labels = tensors.get("labels")
        if z.dim() == 3 and labels is not None:
            labels = labels.repeat(z.shape[0])
        codes = {"gene-batch": cats[0], "protein-batch": cats[0]}
        codes["gene-label"] = codes["protein-label"] = labels
        # exponentiated per feature / category, then gathered: (n, G) values, not (cells, G)
        theta_x = self._by_code(torch.exp(self.px_r), codes.get(self.gene_dispersion))
        theta_y = self._by_code(torch.exp(self.py_r), codes.get(self.protein_dispersion))
        if z.dim() == 3:  # per-cell rows (codes were repeated per sample): restore the axis
            theta_x = unflat(theta_x) if theta_x.dim() == 2 else theta_x
            theta_y = unflat(theta_y) if theta_y.dim() == 2 else theta_y
        mean = {"mu": px_["rate"]}
        if lazy:
            mean = {"scale_logits": px_["scale_logits"], "library": library}
        if self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(theta=theta_x, zi_logits=px_["dropout"], **mean)
        else:
            px = NegativeBinomial(theta=theta_x, **mean)
        py = NegativeBinomialMixture(
            mu1=py_["rate_back"], mu2=py_["rate_fore"], theta1=theta_y, mixture_logits=py_["mixing"]
        )
        return {"px": px, "py": py, "px_": px_, "py_": py_, "log_pro_back_mean": log_back}

    def loss(
        self, tensors: dict[str, torch.Tensor], inf: dict, gen: dict, kl_weight: float = 1.0
    ) -> LossOutput:
        """Negative ELBO of the minibatch; KL of z and of the background weighted by kl_weight."""
        x, y, b = tensors["x"], tensors["protein"], tensors["batch"]
        # the loss is the mean over cells: each row sum gets -1/cells (the kernel's hint)
        rec_genes = -gen["px"].log_prob_sum(x, row_grad=-1.0 / max(x.shape[0], 1))
        rec_proteins, kl_back = self.protein_terms(gen, y, b)
        kl_z = latent_kl(inf)
        kl_l = torch.zeros_like(kl_z)
        if inf["ql_m"] is not None:
            kl_l = kl_normal(
                inf["ql_m"],
                inf["ql_v"],
                self.library_log_means[b].unsqueeze(-1),
                self.library_log_vars[b].unsqueeze(-1),
            )
        loss = torch.mean(rec_genes + rec_proteins + kl_weight * (kl_z + kl_back) + kl_l)
        extra = {"reconstruction_protein": rec_proteins, "kl_background": kl_back}
        if self.classifier is not None:
            adv_clf, adv_fool = self._adversarial(inf["z"], b)
            loss = loss + adv_clf.mean() + self.adversarial_weight * adv_fool.mean()
            extra["adversarial_ce"] = adv_clf
        return LossOutput(
            loss=loss,
            reconstruction=rec_genes + rec_proteins,
            kl_local=kl_z + kl_back + kl_l,
            extra=extra,
        )

    def protein_terms(
        self, gen: dict, y: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell protein reconstruction and background KL, over the proteins measured.

        ``rec = -Σ_t m_t log p(y_t)`` (the mixture ``gen["py"]``) and ``kl = Σ_t m_t
        KL(N(α_t, σ_t²) ‖ N(prior_mean[t, b], exp(prior_log_scale[t, b])²))``, with
        ``m = protein_batch_mask[b]``. A float32 CPU minibatch takes the compiled kernel: one
        call forward and one backward, where the torch operators below are ~70 small calls
        (a training step at 256 cells and 49 proteins: 9.72 -> 9.11 ms; benchmarks/README.md,
        session 23).
        """
        py, py_ = gen["py"], gen["py_"]
        alpha, beta = py_["back_alpha"], py_["back_beta"]
        entries = (py.mu1, py.mu2, py.mixture_logits, alpha, beta)  # each (cells, proteins)
        priors = (self.prior_mean, self.prior_log_scale)
        if (
            y.dim() == 2
            and py.theta2 is None
            and py.theta1.shape in (y.shape[1:], y.shape)  # per protein, or batch and protein
            and b.shape == y.shape[:1]
            and all(t.shape == y.shape for t in entries)
            and _kernels.takes(py.theta1, y, *entries, *priors)
        ):
            theta = py.theta1.clamp_min(py.eps)
            tensors = [t.contiguous() for t in (*entries[:2], theta, *entries[2:], *priors)]
            return _ProteinTerms.apply(
                *tensors,
                y.contiguous(),
                b.long().contiguous(),
                self.protein_batch_mask,
                py.eps,
                _wants_grad(*tensors),
            )
        mask = self.protein_batch_mask[b].to(y.dtype)  # (cells, proteins), 1 = measured
        rec = -(py.log_prob(y) * mask).sum(-1)
        prior_m = rows_of(self.prior_mean.T, b)
        prior_v = torch.exp(2 * rows_of(self.prior_log_scale.T, b))
        kl = kl_normal_elementwise(alpha, beta**2, prior_m, prior_v)
        return rec, (kl * mask).sum(-1)

    def _adversarial(
        self, z: torch.Tensor, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell classifier cross-entropy (trains the classifier) and fooling loss (encoder).

        The first term sees ``z.detach()``; the second runs the classifier with detached
        parameters and measures the cross-entropy of its prediction against the uniform
        distribution over batches, so its gradient reaches the encoder only.
        """
        ce = F.cross_entropy(self.classifier(z.detach()), batch, reduction="none")
        params = {k: v.detach() for k, v in self.classifier.named_parameters()}
        logits = torch.func.functional_call(self.classifier, params, (z,))
        fool = -F.log_softmax(logits, dim=-1).mean(-1)
        return ce, fool

    def forward(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative and loss for one minibatch."""
        inf = self.inference(tensors)
        gen = self.generative(inf["z"], inf["library"], tensors, lazy_mean=True)
        return self.loss(tensors, inf, gen, kl_weight)

    def training_step(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0):
        """:meth:`forward` with the gradients written by hand, or None where not covered.

        The loss of the minibatch, with each parameter's gradient added to its ``.grad`` as
        ``forward(tensors, kl_weight).loss.backward()`` would, without autograd: the compiled
        kernels, the products and a few elementwise operators between them, forward and back
        (:mod:`cellvae.module._totalvae_step`). None where that code does not cover the model or
        the minibatch: the caller then runs :meth:`forward` and ``backward``.
        """
        return fused_training_step(self, tensors, kl_weight)

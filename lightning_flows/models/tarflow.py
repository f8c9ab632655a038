"""TarFlow (Zhai et al. 2025, "Normalizing Flows are Capable Generative Models"): a normalizing flow whose
blocks are causal transformers over patches, trained by exact maximum likelihood on noise-augmented data.

Tokens. An image ``(C, H, W)`` is cut into ``T = (H / p)(W / p)`` patches of ``d = C p^2`` values (patch size
``p``); a vector ``(D,)`` into ``T = D / p`` groups of ``p`` consecutive coordinates (toy 2D: ``p = 1``, the
point is the sequence of its two coordinates, so a block is an affine coupling of one coordinate given the
other, with alternating roles; larger ``p`` for longer vectors).

Blocks. Block ``k`` reads the tokens in its own order (the natural one for even ``k``, flipped for odd ``k``,
so every token is conditioned on every other one somewhere in the stack) and applies an affine
autoregressive transform, token by token::

    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),      log|det dz/dx| = -sum_i sum_j alpha_ij

where ``(mu_i, alpha_i)`` is the causal transformer's output at position ``i`` of the input sequence
``[start, x_0, ..., x_{T-2}]`` (a learned start token, so the first token is transformed too). The
Jacobian of a block is triangular in its order, hence the exact log-determinant. The base is ``N(0, I)``.

Training: each example gets Gaussian noise ``x + sigma * eps`` (``noise.sigma``, model space) and the loss is
the exact negative log-likelihood of that noisy example, in nats per dimension.

Sampling is sequential: each block's inverse ``x_i = z_i exp(alpha_i(x_<i)) + mu_i(x_<i)`` needs the tokens
before ``i``, so a block costs ``T`` incremental transformer passes (a key/value cache makes each pass one
new token against the cached ones) and the whole flow ``K T`` of them, one after another. Then the samples,
which follow the model of the *noisy* data, are denoised by one score step (Tweedie's formula for Gaussian
noise)::

    x <- x + sigma^2 * grad_x log p_model(x)

one forward and backward pass of the whole flow. ``last_sample_nfe`` counts sequential network evaluations:
``K T`` cached block passes plus 1 for the denoising pass (whose positions run in parallel). The evaluator's
``ms_per_sample`` is the wall-clock cost of all of it.

Likelihood, and what it means for bits/dim. ``log_prob(x)`` is the exact log-density in model space of the
flow, which is a model of the *noise-augmented* data ``x + N(0, sigma^2 I)``. The evaluator reports two
numbers from it (:meth:`TarFlow.likelihood_estimators`):

* ``exact_noisy``: ``log p(x + sigma * eps)`` on held-out data with fresh noise, the quantity training
  minimises (as TarFlow's paper reports it). Its mean is the cross-entropy of the *smoothed* variable
  ``x_dequantised + sigma * eps``; as bits/dim (through the one bits/dim formula) it describes that smoothed
  variable, which has more entropy than the dequantised data. It is **not** an upper bound on the discrete
  data's NLL in general.
* ``exact``: ``log p(x)`` at the dequantised data itself, exactly what every other flow reports: the model
  is a density on R^D, so this is the usual dequantisation bound on the discrete NLL of the model's
  discretisation (comparable with RealNVP, Glow and NSF), paid for with the mismatch of a model of noisy
  data evaluated on clean data (the larger ``sigma``, the larger the price).

Class-conditional (``num_classes > 0``, linked from a ``conditional: true`` DataModule): a learned class
embedding is added to every position of every block's transformer (index ``num_classes``: the null class),
labels are dropped to the null class with probability ``label_dropout`` in training, and
``sample(n, y, guidance=w)`` guides TarFlow's way: each inverse step uses
``(mu, alpha)_null + w ((mu, alpha)_y - (mu, alpha)_null)`` from one call on the doubled batch, and the
denoising step the guided score. ``log_prob(x, y)`` is the exact ``log p(x | y)``; ``log_prob(x)`` without
labels the exact density of the null-class (unconditional) flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flows.flows.preprocess import preprocessing_layers
from lightning_flows.conditioning import check_labels, check_num_classes, require_labels, sampling_labels
from lightning_flows.models.base import GenerativeModel
from lightning_flows.models.options import as_options, store_plain_hyperparameters
from lightning_flows.nn.class_conditioning import ClassEmbedding, drop_labels, null_labels
from lightning_flows.nn.transformer import CausalTransformer
from lightning_flows.ode import standard_normal_log_prob

__all__ = ["TarFlow", "TarFlowNetwork", "NoiseAugmentation", "Patches", "AutoregressiveBlock"]


@dataclass
class TarFlowNetwork:
    """TarFlow's architecture.

    Args:
        patch_size: side ``p`` of the square image patches (each token ``C p^2`` values); vectors: coordinates
            per token. Must divide the image sides (the vector length).
        blocks: flow blocks ``K``; consecutive blocks read the tokens in opposite orders.
        layers: transformer layers per block.
        width: transformer width; heads: attention heads (dividing ``width``); mlp_ratio: MLP width / width.
        scale_bound: soft bound on the log-scales, ``alpha = b tanh(a / b)`` (|alpha| < b per block and
            coordinate; keeps early training stable); 0 leaves them unbounded.
    """

    patch_size: int = 2
    blocks: int = 4
    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    scale_bound: float = 4.0

    def __post_init__(self):
        if min(self.patch_size, self.blocks, self.layers, self.width, self.heads, self.mlp_ratio) < 1:
            raise ValueError(f"TarFlow's patch_size, blocks, layers, width, heads and mlp_ratio must all be >= 1, "
                             f"got {self}.")
        if self.width % self.heads:
            raise ValueError(f"TarFlow's width ({self.width}) must be divisible by heads ({self.heads}).")
        if self.scale_bound < 0:
            raise ValueError(f"scale_bound must be >= 0 (0: unbounded log-scales), got {self.scale_bound}.")


@dataclass
class NoiseAugmentation:
    """TarFlow's Gaussian noise.

    Args:
        sigma: standard deviation (model space, where data lie in [-1, 1]) of the noise added to every training
            example; the flow models the data convolved with ``N(0, sigma^2 I)``. 0: no noise (then no denoising).
        denoise: finish sampling with the score step ``x + sigma^2 grad log p(x)`` (one more network evaluation).
    """

    sigma: float = 0.05
    denoise: bool = True

    def __post_init__(self):
        if self.sigma < 0:
            raise ValueError(f"the noise level sigma must be >= 0, got {self.sigma}.")


class Patches:
    """Examples ``(B, *data_shape)`` <-> token sequences ``(B, T, d)`` (see the module docstring)."""

    def __init__(self, data_shape: Sequence[int], patch_size: int):
        self.data_shape, self.patch_size = tuple(data_shape), patch_size
        if len(self.data_shape) == 3:
            c, h, w = self.data_shape
            if h % patch_size or w % patch_size:
                raise ValueError(f"TarFlow's patch_size {patch_size} must divide the image sides {h}x{w}.")
            self.tokens, self.token_dim = (h // patch_size) * (w // patch_size), c * patch_size ** 2
        elif len(self.data_shape) == 1:
            if self.data_shape[0] % patch_size:
                raise ValueError(f"TarFlow's patch_size {patch_size} must divide the vector length "
                                 f"{self.data_shape[0]} (coordinates per token).")
            self.tokens, self.token_dim = self.data_shape[0] // patch_size, patch_size
        else:
            raise ValueError(f"TarFlow models images (C, H, W) or vectors (D,), got data_shape {self.data_shape}.")

    def to_tokens(self, x: Tensor) -> Tensor:
        if len(self.data_shape) == 1:
            return x.reshape(x.shape[0], self.tokens, self.token_dim)
        c, h, w = self.data_shape
        p = self.patch_size
        patches = x.reshape(x.shape[0], c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(x.shape[0], self.tokens, self.token_dim)

    def to_data(self, tokens: Tensor) -> Tensor:
        if len(self.data_shape) == 1:
            return tokens.reshape(tokens.shape[0], *self.data_shape)
        c, h, w = self.data_shape
        p = self.patch_size
        patches = tokens.reshape(tokens.shape[0], h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(tokens.shape[0], c, h, w)


class AutoregressiveBlock(nn.Module):
    """One TarFlow block on tokens ``(B, T, d)``: ``forward(x) -> (z, log|det dz/dx|: (B,))``, ``inverse(z) -> x``.

    ``reverse``: read the tokens last to first. ``labels``: ``(B,)`` classes of a conditional block (None: the
    null class); an unconditional block takes none. The output head starts at zero, so a new block is the
    identity.
    """

    def __init__(self, tokens: int, token_dim: int, network: TarFlowNetwork, reverse: bool, num_classes: int = 0):
        super().__init__()
        self.tokens, self.token_dim, self.reverse = tokens, token_dim, reverse
        self.scale_bound = network.scale_bound
        self.embed = nn.Linear(token_dim, network.width)
        self.start = nn.Parameter(torch.zeros(network.width))
        self.position = nn.Parameter(0.02 * torch.randn(tokens, network.width))
        self.transformer = CausalTransformer(network.width, network.layers, network.heads, network.mlp_ratio)
        self.head = nn.Linear(network.width, 2 * token_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        if num_classes:
            self.class_embed = ClassEmbedding(num_classes, network.width)

    # ---- the conditioner: (mu, alpha) of token i from the tokens before it ----
    def _context(self, labels: Tensor | None, batch: int, like: Tensor) -> Tensor | float:
        """The per-sequence class embedding ``(B, 1, width)`` added to every position (0 when unconditional)."""
        if not self.num_classes:
            if labels is not None:
                raise ValueError("this TarFlow is unconditional (num_classes=0) and takes no labels.")
            return 0.0
        return self.class_embed(labels, batch, like.device)[:, None]

    def _affine(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """Transformer outputs ``(..., width)`` -> ``(mu, alpha)``, each ``(..., d)``."""
        mu, alpha = self.head(out).chunk(2, dim=-1)
        if self.scale_bound > 0:
            alpha = self.scale_bound * torch.tanh(alpha / self.scale_bound)
        return mu, alpha

    def conditioner(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, alpha)``, each ``(B, T, d)``, of every token of ``x: (B, T, d)`` (in this block's order) at once:
        position ``i`` reads ``[start, x_0, ..., x_{i-1}]``."""
        batch = x.shape[0]
        start = self.start.expand(batch, 1, -1)
        h = torch.cat([start, self.embed(x[:, :-1])], dim=1) + self.position + self._context(labels, batch, x)
        return self._affine(self.transformer(h))

    def _ordered(self, tokens: Tensor) -> Tensor:
        return tokens.flip(1) if self.reverse else tokens

    # ---- the bijection ----
    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self._ordered(x)
        mu, alpha = self.conditioner(x, labels)
        z = (x - mu) * torch.exp(-alpha)
        return self._ordered(z), -alpha.flatten(1).sum(1)

    def inverse(self, z: Tensor, labels: Tensor | None = None, guidance: float = 1.0, cached: bool = True) -> Tensor:
        """``x`` with ``forward(x) = z``, one token after another.

        ``cached``: each step is one incremental transformer pass over the new token against a key/value
        cache (``T`` passes in all); ``False`` re-runs the whole prefix every step (the reference the cache is
        tested against). ``guidance != 1`` (conditional blocks, ``labels`` given): the classifier-free guided
        ``(mu, alpha)`` of the conditional and null branches, both from one call on the doubled batch.
        """
        z = self._ordered(z)
        batch = z.shape[0]
        guided = self.num_classes > 0 and labels is not None and guidance != 1.0
        branch_labels = torch.cat([labels, null_labels(batch, self.num_classes, labels.device)]) if guided else labels
        branches = 2 * batch if guided else batch
        context = self._context(branch_labels, branches, z)
        context = context[:, 0] if torch.is_tensor(context) else context  # (2B or B, width), or 0
        cache = self.transformer.new_cache(branches, self.tokens, like=z) if cached else None
        xs: list[Tensor] = []
        previous = self.start.expand(branches, -1)
        for i in range(self.tokens):
            if cached:
                h = (previous if i == 0 else self.embed(previous)) + self.position[i] + context
                out = self.transformer(h[:, None], cache)[:, 0]
                mu, alpha = self._affine(out)
            else:
                prefix = torch.stack(xs + [z.new_zeros(batch, self.token_dim)] * (self.tokens - i), dim=1)
                prefix = torch.cat([prefix, prefix]) if guided else prefix
                mu, alpha = (p[:, i] for p in self.conditioner(prefix, branch_labels))
            if guided:
                (mu_c, mu_u), (alpha_c, alpha_u) = mu.chunk(2), alpha.chunk(2)
                mu, alpha = mu_u + guidance * (mu_c - mu_u), alpha_u + guidance * (alpha_c - alpha_u)
            x_i = z[:, i] * torch.exp(alpha) + mu
            xs.append(x_i)
            previous = torch.cat([x_i, x_i]) if guided else x_i
        return self._ordered(torch.stack(xs, dim=1))


class TarFlow(GenerativeModel):
    """TarFlow for images or vectors (see the module docstring).

    Args:
        data_shape: one example's shape (linked from the DataModule by the CLI).
        network: :class:`TarFlowNetwork` (patch size, blocks, layers, width, heads, ...), or its dict form.
        noise: :class:`NoiseAugmentation` (sigma, denoise), or its dict form.
        preprocess: ``none`` (the paper: the flow models model space, [-1, 1] for images), ``logit`` (images: the
            flow models RealNVP's logit of the pixels, its log-det part of ``log_prob``; the noise, the denoising
            step and the flow then live in that space) or ``auto`` (logit for images).
        logit_alpha: the logit's boundary margin.
        num_classes: classes of the labels (linked from a ``conditional: true`` DataModule); 0 = unconditional.
        label_dropout: probability that a training label is replaced by the null class (guidance needs the
            unconditional branch it trains); used when ``num_classes > 0``.
    """

    likelihood = "exact"
    objective = "Exact MLE via change-of-vars (noise-augmented data)"

    def __init__(self, data_shape: Sequence[int] = (2,), network: TarFlowNetwork | dict | None = None,
                 noise: NoiseAugmentation | dict | None = None, preprocess: str = "none", logit_alpha: float = 0.05,
                 lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0, num_classes: int = 0,
                 label_dropout: float = 0.1):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.network_options = as_options(TarFlowNetwork, network, "network")
        self.noise = as_options(NoiseAugmentation, noise, "noise")
        store_plain_hyperparameters(self, network=self.network_options, noise=self.noise)
        self.num_classes = check_num_classes(num_classes)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}.")
        self.label_dropout = label_dropout
        # The logit of RealNVP and Glow, if asked for: the flow (and its noise) then lives in logit space.
        (self.logit,) = preprocessing_layers(preprocess, self.data_shape, logit_alpha) or (None,)
        self.patches = Patches(self.data_shape, self.network_options.patch_size)
        self.blocks = nn.ModuleList(
            AutoregressiveBlock(self.patches.tokens, self.patches.token_dim, self.network_options, reverse=k % 2 == 1,
                                num_classes=self.num_classes)
            for k in range(self.network_options.blocks))

    @property
    def sequential_steps(self) -> int:
        """Incremental transformer passes one sample costs, one after another: ``K`` blocks x ``T`` tokens."""
        return len(self.blocks) * self.patches.tokens

    # ---- spaces: model space x <-> flow space y (the logit preprocessing, or the identity) ----
    def to_flow_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: (B, *data_shape)`` -> ``(y, log|dy/dx|: (B,))``."""
        if self.logit is None:
            return x, x.new_zeros(x.shape[0])
        return self.logit(x)

    def from_flow_space(self, y: Tensor) -> Tensor:
        return y if self.logit is None else self.logit.inverse(y)

    def flow_space_log_det(self, y: Tensor) -> Tensor:
        """``log|dy/dx|`` at the ``x`` that maps to ``y`` (for points made in flow space, e.g. noisy ones):
        ``(B, *data_shape)`` -> ``(B,)``. The logit's ``log((1 - 2 alpha) / 2) - log p - log(1 - p)`` with
        ``p = sigmoid(y)``, written with softplus so that it stays finite for any ``y``."""
        if self.logit is None:
            return y.new_zeros(y.shape[0])
        per_dim = math.log((1.0 - 2.0 * self.logit.alpha) / 2.0) + F.softplus(y) + F.softplus(-y)
        return per_dim.flatten(1).sum(1)

    # ---- the flow, in flow space ----
    def flow_forward(self, y: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The blocks: ``y: (B, *data_shape)`` -> ``(z: (B, T, d), log|det dz/dy|: (B,))``."""
        tokens, total = self.patches.to_tokens(y), y.new_zeros(y.shape[0])
        for block in self.blocks:
            tokens, log_det = block(tokens, labels)
            total = total + log_det
        return tokens, total

    def flow_inverse(self, z: Tensor, labels: Tensor | None = None, guidance: float = 1.0,
                     cached: bool = True) -> Tensor:
        """The blocks backwards: tokens ``z: (B, T, d)`` -> ``y: (B, *data_shape)``, one token at a time."""
        for block in reversed(self.blocks):
            z = block.inverse(z, labels, guidance, cached)
        return self.patches.to_data(z)

    def flow_log_density(self, y: Tensor, labels: Tensor | None = None) -> Tensor:
        """``log p(y)`` in flow space, ``(B,)``: the base density of ``z`` plus the blocks' log-determinants."""
        z, log_det = self.flow_forward(y, labels)
        return standard_normal_log_prob(z) + log_det

    # ---- the model in model space ----
    def to_noise(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The normalizing direction: ``x: (B, *data_shape)`` -> ``(z: (B, T, d), log|det dz/dx|: (B,))``."""
        y, log_det = self.to_flow_space(x)
        z, flow_log_det = self.flow_forward(y, labels)
        return z, log_det + flow_log_det

    def invert(self, z: Tensor, labels: Tensor | None = None, guidance: float = 1.0, cached: bool = True) -> Tensor:
        """The generative direction without denoising: tokens ``z: (B, T, d)`` -> ``x: (B, *data_shape)``."""
        return self.from_flow_space(self.flow_inverse(z, labels, guidance, cached))

    def _labels(self, y: Tensor | None, batch: int, device) -> Tensor | None:
        if y is None:
            return None
        return check_labels("TarFlow", self.num_classes, y, batch).to(device)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact ``log p(x)`` in nats of the flow (a model of the noise-augmented data), ``(B, *data_shape)`` ->
        ``(B,)``; with labels ``y: (B,)`` the exact ``log p(x | y)``, without them a conditional model's null-class
        (unconditional) density. No noise is added here: see :meth:`noisy_log_prob`."""
        labels = self._labels(y, x.shape[0], x.device)
        points, log_det = self.to_flow_space(x)
        return self.flow_log_density(points, labels) + log_det

    def _noisy_log_density(self, x: Tensor, labels: Tensor | None) -> Tensor:
        points = self.to_flow_space(x)[0] + self.noise.sigma * torch.randn_like(x)
        return self.flow_log_density(points, labels) + self.flow_space_log_det(points)

    def noisy_log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The exact log-density in model space at a noise-augmented example: ``x`` taken to flow space, plus
        ``sigma * eps`` (fresh ``eps ~ N(0, I)``, global RNG), taken back. What training maximises."""
        return self._noisy_log_density(x, self._labels(y, x.shape[0], x.device))

    def likelihood_estimators(self):
        """``exact``: the density at the (dequantised) data; ``exact_noisy``: at the data plus fresh noise of the
        training level (see the module docstring for what each means in bits/dim)."""
        estimators = {"exact": self.log_prob}
        if self.noise.sigma > 0:
            estimators["exact_noisy"] = self.noisy_log_prob
        return estimators

    def likelihood_traits(self) -> dict:
        """For the evaluator's labels (:mod:`lightning_flows.evaluation.likelihood_labels`): ``exact`` is an exact
        density at the data (the default traits); ``exact_noisy`` is exact but of the noise-augmented variable, so
        it is never a bound on the data's NLL nor the table's headline."""
        return {"exact_noisy": {"name": "exact, of the noise-augmented data (not a bound on the data's NLL)",
                                "value": "exact", "of_the_data": False}}

    # ---- training ----
    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact NLL of the noise-augmented batch in nats per dimension, ``-log p(x + sigma eps [| y]) / D``."""
        labels = require_labels("TarFlow", self.num_classes, y, x.shape[0])
        if labels is not None:
            labels = drop_labels(labels, self.label_dropout, self.num_classes)
        return -self._noisy_log_density(x, labels).mean() / self.dim

    # ---- sampling ----
    def _requested_classes(self, n: int, y: Tensor | None, guidance: float) -> Tensor | None:
        if not self.is_conditional:
            if y is not None or guidance != 1.0:
                raise ValueError("TarFlow is unconditional (num_classes=0): sample without y and with guidance=1.0, "
                                 "or train a conditional model (data.conditional: true).")
            return None
        return sampling_labels("TarFlow", self.num_classes, y, n, self.device)

    def score(self, y: Tensor, labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """``grad_y log p(y [| labels])`` in flow space (the classifier-free guided score for ``guidance != 1``),
        ``(B, *data_shape)``; one forward and backward pass of the flow (on the doubled batch when guided). Works
        inside inference mode."""
        guided = labels is not None and guidance != 1.0
        with torch.inference_mode(False), torch.enable_grad():
            y = y.clone()  # an ordinary tensor (sampling runs in inference mode)
            points = torch.cat([y, y]) if guided else y
            branch_labels = torch.cat([labels, null_labels(len(y), self.num_classes, y.device)]) if guided else labels
            points.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.flow_log_density(points, branch_labels).sum(), points)
        if guided:
            conditional, unconditional = grad.chunk(2)
            return unconditional + guidance * (conditional - unconditional)
        return grad

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """``n`` samples ``(n, *data_shape)``: invert the flow from ``N(0, I)`` with the key/value cache, then (with
        ``noise.denoise`` and ``sigma > 0``) one denoising score step. A conditional model draws class ``y[i]`` for
        row ``i`` (uniform classes when ``y`` is None) with guidance weight ``guidance``."""
        labels = self._requested_classes(n, y, guidance)
        z = torch.randn(n, self.patches.tokens, self.patches.token_dim, device=self.device)
        y = self.flow_inverse(z, labels, guidance)
        nfe = self.sequential_steps
        if self.noise.denoise and self.noise.sigma > 0:  # in flow space, where the noise was added
            y = y + self.noise.sigma ** 2 * self.score(y, labels, guidance)
            nfe += 1
        self.last_sample_nfe = nfe
        return self.from_flow_space(y)

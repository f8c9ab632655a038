"""What each reported likelihood *is*: the label a table prints beside it, and whether it is an upper bound on
the NLL that every row of that table can be compared on.

On discrete data (``L`` levels, ``D`` dimensions) the quantity every family can be compared on is the discrete
NLL ``-log P(k)`` of the integer levels ``k``. A model with a continuous density ``p`` on the dequantised data
defines ``P(k) = int_cube p(k + u) du`` (in model space: ``p`` integrated over the level cell), and

* one uniform dequantisation draw ``u`` gives ``E_u[log p(k + u)] <= log P(k)`` (Jensen): the *dequantised
  bound* (Theis et al. 2016), what ``bpd_<kind>`` reports for such a model;
* ``K`` draws give the importance-weighted bound ``E[log (1/K) sum_k p(k + u_k)] <= log P(k)``, which tightens as
  ``K`` grows and reaches ``log P(k)`` as ``K -> inf`` (Ho et al. 2019, Flow++): ``bpd_iw_<kind>``.

The same holds when ``p`` itself is only available as an unbiased estimate of the density (a VAE's ``IWAE_K``:
``exp(IWAE_K)`` is an unbiased estimate of ``p(x)``, so the average over both the dequantisation and the latent
draws is an unbiased estimate of ``P(k)`` and its log a lower bound). It does *not* hold for an unbiased
estimate of ``log p`` (Hutchinson's trace): the log-mean-exp of such estimates is only an estimate of the IW
bound, which may land on either side of ``log P(k)`` (and in practice lands low: the log-mean-exp favours
the draws whose probe noise was favourable); it is computed only on request (``EvaluationSpec.iw_estimates``),
labelled so and not flagged as a bound. Nor for
a variational bound whose exponential is not an unbiased density estimate (DDPM's ``L``): it is reported at
``K = 1`` only, still an upper bound on the discrete NLL in expectation.

A family describes its likelihoods with an optional ``likelihood_traits()`` (``{kind: {field: value}}``,
fields of :class:`LikelihoodTraits`); without it the kind's name decides (``exact``: an exact density;
``estimate``: an unbiased estimate of ``log p``; ``bound``: a lower bound on ``log p`` of unknown kind).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LikelihoodTraits:
    """What one of a family's likelihoods returns.

    Attributes:
        name: the family's own name for it: ``exact``, ``estimate``, ``ELBO / IWAE-64 bound``, ``DDPM bound``, ...
        value: ``exact`` (``log p(x)`` itself, up to solver error), ``estimate`` (an unbiased estimate of
            ``log p(x)``) or ``bound`` (in expectation ``<= log p(x)``).
        on_levels: the density is piecewise constant on the level cells (a discrete decoder: ``log P(k)`` spread
            over the cell), so its value already is the discrete likelihood, with no dequantisation gap.
        unbiased_density: ``exp(value)`` is ``p(x)`` or an unbiased estimate of it (exact densities, IWAE):
            the log-mean-exp over dequantisation draws is then a lower bound on ``log P(k)``.
        of_the_data: False for the likelihood of another variable than the data (TarFlow's density at the data
            plus fresh training noise): reported under its own name, never importance-weighted and never a bound
            on the data's NLL (so never the table's headline).
    """

    name: str
    value: str
    on_levels: bool = False
    unbiased_density: bool = False
    of_the_data: bool = True

    @property
    def importance_weightable(self) -> bool:
        """Whether averaging over dequantisation draws means anything: a continuous density, exact or an
        unbiased estimate of the density (a bound on ``log P(k)``) or of its log (an estimate of that bound)."""
        return self.of_the_data and not self.on_levels and (self.unbiased_density or self.value == "estimate")


DEFAULT_TRAITS = {
    "exact": LikelihoodTraits("exact", "exact", unbiased_density=True),
    "estimate": LikelihoodTraits("estimate", "estimate"),
    "bound": LikelihoodTraits("bound", "bound"),
}


def likelihood_traits(model, kind: str) -> LikelihoodTraits:
    """The traits of ``model``'s likelihood ``kind``: the family's own ``likelihood_traits()[kind]`` where it
    describes it, else :data:`DEFAULT_TRAITS` by the kind's name."""
    described = (getattr(model, "likelihood_traits", None) or (lambda: {}))().get(kind)
    if described is None:
        if kind not in DEFAULT_TRAITS:
            raise ValueError(f"{type(model).__name__} reports a likelihood of kind '{kind}'; kinds are "
                             f"{', '.join(DEFAULT_TRAITS)} (or describe it in likelihood_traits()).")
        return DEFAULT_TRAITS[kind]
    known = {f.name for f in fields(LikelihoodTraits)}
    return LikelihoodTraits(**{k: v for k, v in described.items() if k in known})


def label(traits: LikelihoodTraits, discrete: bool) -> str:
    """The label of the one-draw value ``nll_<kind>``: what it is, in the words of issue 20's table.

    Continuous data: the family's name (``exact``, ``estimate (Hutchinson)``, ``ELBO / IWAE-256 bound``, ...).
    Discrete data: a discrete likelihood keeps its name; a continuous density on the dequantised data is a
    ``dequantised bound`` (with ``, unbiased estimate`` for Hutchinson's), a variational bound of one a
    ``dequantised <name>``.
    """
    name = "estimate (Hutchinson)" if traits.name == "estimate" else traits.name
    if not discrete or traits.on_levels or not traits.of_the_data:
        return name
    # A family's own name for an exact value or an estimate rides along, less the word the label already says
    # (MeanFlow's "estimate, ODE of u(z, t, t)" -> "..., unbiased estimate (Hutchinson), ODE of u(z, t, t)").
    detail = "" if traits.name in ("exact", "estimate") else ", " + traits.name.removeprefix(f"{traits.value}, ")
    if traits.value == "exact":
        return f"dequantised bound{detail}"
    if traits.value == "estimate":
        return f"dequantised bound, unbiased estimate (Hutchinson){detail}"
    return f"dequantised {name}"


def iw_label(traits: LikelihoodTraits, samples: int) -> str:
    """The label of ``nll_iw_<kind>``, the log-mean-exp over ``samples`` dequantisation draws."""
    if traits.unbiased_density:
        inner = "" if traits.value == "exact" else f" ({traits.name} inside)"
        return f"discrete, IW-{samples} bound{inner}"
    return f"discrete, IW-{samples} estimate (Hutchinson: estimates the IW-{samples} bound, either side of it)"


def is_upper_bound(traits: LikelihoodTraits, importance_weighted: bool = False) -> bool:
    """Whether the reported NLL is, in expectation over the evaluator's draws, ``>=`` the model's own NLL of the
    same examples (discrete data: ``-log P(k)``; an exact value counts, with equality). Only the IW average of
    unbiased *log*-density estimates (Hutchinson's) is not, nor a likelihood of another variable (``of_the_data``)."""
    return traits.of_the_data and not (importance_weighted and not traits.unbiased_density)

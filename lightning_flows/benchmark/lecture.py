"""The lecture's qualitative comparison table (../shared/seed, last lines), row by row, so the measured
table can print each claim next to its measurement; and, below them, the families "beyond the lecture" that
answer one of its key limitations, each with its paper's claims in the same columns."""

from __future__ import annotations

LECTURE_COLUMNS = ("Training objective", "Sampling speed", "Likelihood", "Sample quality", "Key limitations")

# family -> (method name in the lecture, its row)
LECTURE_ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "VAE": ("VAE", ("ELBO (variational)", "Fast (1 forward pass)", "Approximate", "Medium",
                    "Blurry outputs, posterior gap")),
    "GAN": ("GAN", ("Adversarial loss", "Very Fast", "No", "High", "Mode collapse, instability")),
    "RealNVP": ("Normalizing Flow (NF)", ("Exact MLE via change-of-vars", "Fast (invertible map)", "Exact",
                                          "Medium", "Invertibility/triangular Jacobian limits expressiveness")),
    "CNF": ("Continuous NF (CNF)", ("Exact MLE via ODE + trace", "Medium–Slow (solve ODE)", "Exact",
                                    "Medium–High", "ODE cost, adjoint complexity, numerical instability")),
    "Diffusion": ("Diffusion Models", ("Score matching (denoising)", "Slow (many denoise steps)", "Implicit",
                                       "Very High", "Expensive sampling, long reverse chain")),
    "FlowMatching": ("Flow Matching (FM)", ("Supervised learning of velocities", "Medium–Fast (short ODE solve)",
                                            "Implicit", "High", "Depends on path choice; ODE still needed")),
}
LECTURE_ROWS["Glow"] = LECTURE_ROWS["RealNVP"]
LECTURE_ROWS["NSF"] = LECTURE_ROWS["RealNVP"]

# family -> (method, its claims in the lecture's columns, from its paper): answers to a lecture row's limitation.
BEYOND_THE_LECTURE: dict[str, tuple[str, tuple[str, ...]]] = {
    "TarFlow": ("TarFlow (Zhai et al. 2025)", (
        "Exact MLE via change-of-vars (noise-augmented data)",
        "Slow (sequential over patches: blocks x tokens steps) + 1 denoising pass",
        "Exact (of the data + N(0, sigma^2) noise)", "High (paper: near diffusion)",
        "Sequential sampling cost (answers: triangular Jacobian limits expressiveness)")),
    "MeanFlow": ("MeanFlow (Geng et al. 2025)", (
        "Regression on the MeanFlow identity (average velocity, JVP)", "Very fast (1 NFE)",
        "Exact only through the instantaneous field's ODE", "High at 1 NFE (paper: FID 3.43, ImageNet 256)",
        "Quality gap between 1 and 2 NFE (answers: ODE still needed)")),
}


def lecture_row(family: str) -> tuple[str, str, tuple[str, ...]]:
    """``(method, source, claims)`` of a family: ``source`` is ``lecture`` or ``beyond the lecture``; a family in
    neither table gets its own name and dashes."""
    if family in LECTURE_ROWS:
        return (*LECTURE_ROWS[family][:1], "lecture", LECTURE_ROWS[family][1])
    if family in BEYOND_THE_LECTURE:
        return (*BEYOND_THE_LECTURE[family][:1], "beyond the lecture", BEYOND_THE_LECTURE[family][1])
    return family, "lecture", ("-",) * len(LECTURE_COLUMNS)

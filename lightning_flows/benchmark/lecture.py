"""The lecture's qualitative comparison table (../shared/seed, last lines), row by row, so the measured
table can print each claim next to its measurement."""

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

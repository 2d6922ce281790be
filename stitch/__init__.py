"""Stitching: compare representations, translate one model's latents into another's, and plug models together.

Submodules: `similarity` (CKA, SVCCA/PWCCA, Procrustes, shape metrics), `translate` (fit/transform latent
translators), `relative` (relative representations), `anchors` (anchor selection). Import them directly;
this package imports nothing heavy on its own.
"""

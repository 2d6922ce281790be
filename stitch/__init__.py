"""Stitching: compare representations, translate one model's latents into another's, and plug models together.

Submodules: `similarity` (CKA, SVCCA/PWCCA, Procrustes, shape metrics), `translate` (fit/transform latent
translators), `relative` (relative representations), `anchors` (anchor selection), `features` (cut models
into stages, capture per-layer features, Hugging Face encoders too), `learned` (closed-form and fine-tuned
stitching layers), `heads` (linear/logistic heads on frozen features), `stitched` (the stitched-model
artifact), `planner` (score candidate cuts), `pipeline` (the recipe's `stitch:` section), `feature_cache` (encoder features kept on disk). Import them
directly; this package imports nothing heavy on its own.
"""

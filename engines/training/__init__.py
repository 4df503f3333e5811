"""Training recipes: EDM teacher, consistency distillation, latent consistency, classifier.

Every recipe is seeded and resumable (a checkpoint every N steps in its work folder,
`--resume` continues it), prints progress, and ends by writing a model package with a
model card into model_repo/.
"""

RECIPES = ("edm-teacher", "cd", "autoencoder", "lcm-teacher", "lcm", "classifier")

"""Training recipes: EDM teacher, consistency distillation, latent consistency, classifier,
and the speech teacher and students.

Every recipe is seeded and resumable (a checkpoint every N steps in its work folder,
`--resume` continues it), prints progress, and ends by writing a model package with a
model card into model_repo/. registry.py holds the recipe registry (name -> arguments,
run); image_recipes.py and speech_recipes.py list their recipes; recipes.py registers them
for `fewstep train`.
"""

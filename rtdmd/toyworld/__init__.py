"""The embedded default world: procedural shape scenes, GenEval-style prompts, an exact detector."""

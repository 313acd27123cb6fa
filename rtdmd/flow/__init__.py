"""Pure tensor maths of flow matching: the path, CPS steps and log-probs, step schedules."""

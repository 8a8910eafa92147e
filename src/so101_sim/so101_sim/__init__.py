"""MuJoCo SO-101 pick-place simulation, scripted expert, sim node and closed-loop evaluation."""

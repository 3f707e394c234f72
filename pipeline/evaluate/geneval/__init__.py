"""GenEval, implemented from its protocol (spec/geneval.md), for stage gates and by hand.

prompts.py loads and validates prompt sets (the packaged official one, a synthetic one, or a user's
file); generate.py writes images in the official layout (layout.py); detectors/ find objects;
rules.py decides each image; score.py and summary.py produce the official results and summary;
report.py renders HTML and wandb reports. The gate (pipeline/gate.py) strings them together.
"""

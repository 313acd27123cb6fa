"""GenEval below the reward layer (nothing here imports :mod:`rtdmd.rewards`):

* :mod:`~rtdmd.geneval.judge`: the official decision rules on detections, pure, shared by the real
  detector and the toy world's;
* :mod:`~rtdmd.geneval.prompts`: GenEval-format prompt generation (the training prompts);
* :mod:`~rtdmd.geneval.worker`: Mask2Former (mmdetection 3.x) as a worker process, run inside the
  isolated ``tox -e geneval-mmdet`` environment;
* :mod:`~rtdmd.geneval.client`: starts the worker from the main environment and exchanges PNG files,
  npz files and JSON lines with it;
* :mod:`~rtdmd.geneval.colour`: the zero-shot CLIP colour classifier (open_clip ``ViT-L-14-quickgelu``);
* :mod:`~rtdmd.geneval.summary`: results rows and the official ``summary_scores.py`` text.

The registered rewards ``geneval``, ``geneval-strict`` and ``geneval-partial`` live in
:mod:`rtdmd.rewards.geneval_real`. Nothing is imported here: the worker runs where torch 2.1 and
mmdet live, the rest where the harness does.
"""

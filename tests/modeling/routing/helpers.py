"""What several routing test files share: the shape of the noisy top-k router they probe (the ``router`` and
``hidden`` fixtures of conftest.py) and of the losses' inputs."""

HIDDEN, EXPERTS, TOP_K = 16, 8, 2

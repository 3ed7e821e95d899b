"""The pipeline's stages: `python -m stages.NAME` runs one (dvc.yaml lists them).

Python imports this package before the stage module, while `sys.argv[0]` is still "-m" (the
documented behaviour of `python -m`): the one moment a stage can fix its numeric environment
(params.yaml `base.numerics`, lmpipe.core.numerics) before numpy or torch loads. Importing a stage
from other code (tests, a notebook) pins nothing.
"""

import sys

if sys.argv[:1] == ["-m"]:
    from lmpipe.core.numerics import pin_from_params

    pin_from_params()

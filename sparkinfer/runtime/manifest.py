"""What the runtime reads from a compiled module's `manifest.json` (written by
`sparkinfer.compiler`): the arch, the step's geometry, and the ordered inputs of `decode`.

The format has one definition, `sparkinfer.compiler.manifest`, which imports no TVM and
nothing of the build pipeline; `Input` is the step's input record, `sparkinfer.model.spec`.
So modules compiled elsewhere load with runtime-only TVM.
"""

from sparkinfer.compiler.manifest import MANIFEST_NAME as MANIFEST
from sparkinfer.compiler.manifest import Manifest
from sparkinfer.model.spec import StepInput as Input

__all__ = ["MANIFEST", "Input", "Manifest"]

"""Suture: merge and stitch neural networks (suture.merge, suture.stitch, suture.recipes, suture.app).

The design card keeps the subpackages as top-level folders (merge/, stitch/, recipes/, app/); pyproject maps
them under this package, so installed they never collide with other distributions' `merge` or `app`. In a
source checkout run without installing (or a second checkout beside an editable install), the folders beside
this one are the subpackages: their parent joins this package's search path.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "merge" / "store.py").is_file() and (_checkout / "recipes" / "cli.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's own __path__

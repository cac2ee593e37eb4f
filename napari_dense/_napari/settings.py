"""The plugin's settings (napari › Preferences › Plugins): defaults of new runs.

Declared in ``napari.yaml`` under ``contributions.configurations.run``; read through
:func:`napari.settings.get_plugin_settings` (napari ≥ 0.9). With an older napari, or before the
plugin is registered (tests that build widgets directly), the declared defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunSettings", "run_settings"]


@dataclass(frozen=True)
class RunSettings:
    """Defaults of the Dense inference widget's runs."""

    device: str = "auto"
    precision: str = "auto"
    tile: int = 0
    cache_folder: str = ""


def run_settings() -> RunSettings:
    """The user's settings, or the declared defaults where napari cannot provide them."""
    try:
        from napari.settings import get_plugin_settings

        run = get_plugin_settings("napari-dense").run
        return RunSettings(
            device=str(run.device),
            precision=str(run.precision),
            tile=int(run.tile),
            cache_folder=str(run.cache_folder or ""),
        )
    except (ImportError, KeyError, AttributeError, TypeError, ValueError):
        return RunSettings()

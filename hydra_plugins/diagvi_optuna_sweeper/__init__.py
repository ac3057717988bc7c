"""Hydra sweeper ``diagvi_optuna``: an Optuna study driven through Optuna's ask/tell API.

Hydra finds it because ``hydra_plugins`` is a namespace package installed with diagvi; the
config schema is registered (``hydra/sweeper=diagvi_optuna``) when Hydra scans this package.
Kept light on import: Hydra imports every plugin module for every Hydra application.
"""

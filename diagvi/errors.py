"""Errors diagvi raises on bad input."""


class DataError(ValueError):
    """Input data, setup or guidance graph that diagvi cannot use.

    The message names the modality, the field and what was expected.
    """

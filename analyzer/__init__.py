"""Precision analyzer: importance matrices from calibration text (collect), per-tensor sensitivity profiles
(profile), per-tensor type choice under thresholds or a size budget (policy) and the SQLite calibration cache
(cache). See docs/ANALYZER.md."""

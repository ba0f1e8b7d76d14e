"""Evaluation: benchmark data, quality metrics, routing studies, calibration, reports."""

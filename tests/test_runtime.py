"""set_logging_level / set_gpu_mode of the contract's API."""
import logging

import pytest

import amct_retrain

pytestmark = pytest.mark.caffe  # the runtime settings are pycaffe's


def test_logging_level_writes_the_log_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    amct_retrain.set_logging_level("warning", "debug")
    try:
        logging.getLogger("amct_retrain.test").debug("a debug line for the file only")
        for h in logging.getLogger("amct_retrain").handlers:
            h.flush()
        text = (tmp_path / "amct_log" / "amct_caffe.log").read_text()
        assert "a debug line for the file only" in text, f"log file content: {text!r}"
    finally:
        logger = logging.getLogger("amct_retrain")
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_bad_level_and_gpu_mode_are_clear_errors():
    with pytest.raises(ValueError, match="print_level"):
        amct_retrain.set_logging_level("loud")
    with pytest.raises(RuntimeError, match="CPU-only"):
        amct_retrain.set_gpu_mode()

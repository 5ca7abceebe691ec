"""Process-wide settings of the contract's API: Caffe's device and the toolkit's logging."""
import logging
import os

import caffe

from amct_retrain.errors import ArgumentError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_FILE = os.path.join("amct_log", "amct_caffe.log")


def set_cpu_mode() -> None:
    """Run Caffe on the CPU."""
    caffe.set_mode_cpu()


def set_gpu_mode() -> None:
    """Not available: the project's Caffe is built CPU-only (a GPU op would abort the process)."""
    raise RuntimeError("set_gpu_mode: this Caffe is built CPU-only (CPU_ONLY := 1); use set_cpu_mode()")


def set_logging_level(print_level: str = "info", save_level: str = "info") -> None:
    """Log the toolkit's messages to the console at ``print_level`` and to
    ``./amct_log/amct_caffe.log`` at ``save_level`` ('debug', 'info', 'warning', 'error')."""
    for what, level in (("print_level", print_level), ("save_level", save_level)):
        if str(level).lower() not in LEVELS:
            raise ArgumentError(f"set_logging_level: {what} must be one of {sorted(LEVELS)}, got {level!r}")
    logger = logging.getLogger("amct_retrain")
    for handler in [h for h in logger.handlers if getattr(h, "amct_handler", False)]:
        logger.removeHandler(handler)
        handler.close()
    os.makedirs(os.path.dirname(LOG_FILE), exist_ok=True)
    for handler, level in ((logging.StreamHandler(), print_level), (logging.FileHandler(LOG_FILE), save_level)):
        handler.setLevel(LEVELS[level.lower()])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.amct_handler = True
        logger.addHandler(handler)
    logger.setLevel(min(LEVELS[print_level.lower()], LEVELS[save_level.lower()]))
    logger.propagate = False

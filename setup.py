"""amct_retrain: quantization-aware retraining and INT8 export for Caffe models."""
from setuptools import find_packages, setup

setup(
    name="amct_retrain",
    version="0.1.0",
    description="Quantization-aware retraining (ULQ/ARQ) and INT8 export for Caffe models",
    python_requires=">=3.11",
    packages=find_packages(include=["amct_retrain", "amct_retrain.*"])
    + ["amct_retrain_layers", "amct_retrain.solver_templates"],
    # The Caffe Python layers live in layers/ but install as amct_retrain_layers, a name
    # that cannot collide with a user's own `layers` module.
    package_dir={"amct_retrain_layers": "layers", "amct_retrain.solver_templates": "solver_templates"},
    package_data={"amct_retrain.solver_templates": ["*.prototxt"]},
    install_requires=["numpy", "numba", "threadpoolctl", "protobuf", "pyyaml", "tensorboardX", "tqdm"],
    entry_points={"console_scripts": ["amct-retrain=amct_retrain.cli:main"]},
)

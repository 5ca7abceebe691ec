"""The Caffe schema the toolkit reads and writes models with: ``from amct_retrain.caffe_proto import caffe_pb2``.

The deploy model needs fields that BVLC Caffe's ``caffe.proto`` lacks (the original toolkit's
numbers): ``BlobProto.int8_data`` (10), ``int32_data`` (11), ``uint64_data`` (12),
``LayerParameter.quant_param`` (208, ``QuantParameter``) and ``dequant_param`` (200000,
``DequantParameter``). The project's Caffe has them in its own schema (tools/caffe/patch_caffe.py),
and there ``caffe_pb2`` is pycaffe's own module. With a user's own Caffe (``AMCT_CAFFE``) whose
schema lacks them, ``caffe_pb2`` is a module of the toolkit's own, built from that Caffe's schema
(every message, field and enum of its ``caffe.proto``, a fork's custom layers included) plus the
deploy fields, in a descriptor pool of its own (so that it does not clash with pycaffe's module).
Messages of either are the same on the wire and in text format.

Importing this module (every Caffe-backed module does) makes the start-up report of
:mod:`amct_retrain.caffe_build`: the project's Caffe fixes the Caffe in use lacks.
"""
import types

from caffe.proto import caffe_pb2 as pycaffe_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from amct_retrain import caffe_build
from amct_retrain.errors import AmctError

_F = descriptor_pb2.FieldDescriptorProto
# message -> (field name, number, label, type, type name, packed), as tools/caffe/patch_caffe.py adds them.
DEPLOY_FIELDS = {
    "BlobProto": [("int8_data", 10, _F.LABEL_OPTIONAL, _F.TYPE_BYTES, "", False),
                  ("int32_data", 11, _F.LABEL_REPEATED, _F.TYPE_INT32, "", True),
                  ("uint64_data", 12, _F.LABEL_REPEATED, _F.TYPE_UINT64, "", True)],
    "LayerParameter": [("quant_param", 208, _F.LABEL_OPTIONAL, _F.TYPE_MESSAGE, "QuantParameter", False),
                       ("dequant_param", 200000, _F.LABEL_OPTIONAL, _F.TYPE_MESSAGE, "DequantParameter", False)],
}
DEPLOY_MESSAGES = {"QuantParameter": [("scale", 2, _F.LABEL_OPTIONAL, _F.TYPE_FLOAT, "", False),
                                      ("offset", 3, _F.LABEL_OPTIONAL, _F.TYPE_BYTES, "", False)],
                   "DequantParameter": []}


class CaffeSchemaError(AmctError):
    """The Caffe on the Python path has a schema the deploy fields cannot be added to."""


def has_deploy_fields(module: types.ModuleType) -> bool:
    """Whether a caffe_pb2 module has every deploy field, with the original toolkit's numbers."""
    for message, fields in DEPLOY_FIELDS.items():
        by_name = getattr(module, message).DESCRIPTOR.fields_by_name
        if any(name not in by_name or by_name[name].number != number for name, number, *_ in fields):
            return False
    return True


def _add_fields(message: descriptor_pb2.DescriptorProto, fields, package: str, source: str) -> None:
    by_number = {f.number: f.name for f in message.field}
    by_name = {f.name: f.number for f in message.field}
    for name, number, label, type_, type_name, packed in fields:
        if by_name.get(name) == number:  # a fork that has this deploy field already
            continue
        if number in by_number or name in by_name:
            raise CaffeSchemaError(
                f"{source}: {message.name} already has a field "
                f"{'number %d (%s)' % (number, by_number[number]) if number in by_number else repr(name)}: "
                f"the deploy field '{name} = {number}' of the toolkit's deploy models cannot be added. This "
                "Caffe's caffe.proto reuses a number of the original toolkit's schema; use the project's Caffe "
                "(unset AMCT_CAFFE) or renumber that field in your fork")
        field = message.field.add(name=name, number=number, label=label, type=type_, json_name=_json_name(name))
        if type_name:
            field.type_name = f".{package}.{type_name}"
        if packed:
            field.options.packed = True


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def with_deploy_fields(module: types.ModuleType) -> types.ModuleType:
    """A caffe_pb2-like module: ``module``'s schema plus the deploy fields, in its own pool.

    It has every top-level message class and enum of ``module`` (with the enum values at
    module level, as protoc's modules have them: ``caffe_pb2.TRAIN``) and ``DESCRIPTOR``."""
    source = getattr(module, "__file__", module.__name__)
    file_proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(file_proto)
    messages = {m.name: m for m in file_proto.message_type}
    for name in DEPLOY_MESSAGES:
        if name in messages:
            raise CaffeSchemaError(f"{source}: already has a message {name}: the toolkit's deploy message of "
                                   "that name cannot be added; use the project's Caffe (unset AMCT_CAFFE)")
    for name, fields in DEPLOY_MESSAGES.items():
        _add_fields(file_proto.message_type.add(name=name), fields, file_proto.package, source)
    for name, fields in DEPLOY_FIELDS.items():
        _add_fields(messages[name], fields, file_proto.package, source)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    file_descriptor = pool.FindFileByName(file_proto.name)
    out = types.ModuleType(__name__ + ".caffe_pb2", f"{source}'s Caffe schema plus the toolkit's deploy fields")
    out.DESCRIPTOR = file_descriptor
    for name, descriptor in file_descriptor.message_types_by_name.items():
        setattr(out, name, message_factory.GetMessageClass(descriptor))
    for name, descriptor in file_descriptor.enum_types_by_name.items():
        setattr(out, name, EnumTypeWrapper(descriptor))
        for value in descriptor.values:
            setattr(out, value.name, value.number)
    return out


caffe_pb2 = pycaffe_pb2 if has_deploy_fields(pycaffe_pb2) else with_deploy_fields(pycaffe_pb2)

# At start-up: say which of the project's Caffe fixes the Caffe in use lacks (a user's own Caffe).
caffe_build.report()

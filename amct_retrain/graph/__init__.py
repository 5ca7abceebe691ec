"""Graph passes: functions from one caffe_pb2.NetParameter to the next."""

"""Writes one message whose second header's name is the bytes FF FE (not UTF-8).

kafka-python checks that header names are text and encodes them as UTF-8 while it builds the
record batch; the name given here encodes to other bytes. Arguments: bootstrap, topic, the
`neruba-api-key` header's value, the message's value.
"""

import sys

from kafka import KafkaProducer
from kafka.record import default_records


class NotUtf8(str):
    """A header name whose bytes on the wire are not UTF-8."""

    def encode(self, *args, **kwargs):
        return b"\xff\xfe"


BAD = "bad-name"
original = default_records.DefaultRecordBatchBuilder.append


def append(self, offset, timestamp, key, value, headers, *args, **kwargs):
    headers = [(NotUtf8(k) if k == BAD else k, v) for k, v in headers]
    return original(self, offset, timestamp, key, value, headers, *args, **kwargs)


default_records.DefaultRecordBatchBuilder.append = append

bootstrap, topic, api_key, value = sys.argv[1:5]
producer = KafkaProducer(bootstrap_servers=bootstrap, api_version=(2, 0, 0), acks="all")
headers = [("neruba-api-key", api_key.encode()), (BAD, b"v")]
producer.send(topic, value=value.encode(), headers=headers).get(timeout=30)
producer.flush()
print("sent")

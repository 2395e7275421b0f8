"""The instance registry's KV bucket, opened (or created) the same way by everyone."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from rune.subjects import Subjects


async def open_instances_bucket(nc: NATS, subjects: Subjects) -> KeyValue:
    js = nc.jetstream()
    try:
        return await js.key_value(subjects.instances_bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=subjects.instances_bucket,
                                                        history=1))

"""schemas/*.json document the tables users read; they must match what is written."""
import glob
import json
import os

import pyarrow.parquet as pq

from mmdata.schema import SCHEMAS, schema_to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    doc = json.load(open(os.path.join(ROOT, "schemas", f"{name}.json")))
    return [{k: f[k] for k in ("name", "type", "nullable")} for f in doc["fields"]], doc


def test_schema_files_match_code():
    for name, schema in SCHEMAS.items():
        fields, doc = load(name)
        assert fields == schema_to_json(schema), name
        assert all(f["description"] for f in doc["fields"])


def test_written_tables_match_schema_files(built):
    out, _ = built
    shard_fields, _ = load("shard_table")
    for f in glob.glob(f"{out}/shards/*.parquet"):
        assert schema_to_json(pq.read_schema(f).remove_metadata()) == shard_fields
    plan_fields, _ = load("plan_table")
    assert schema_to_json(pq.read_schema(f"{out}/plan.parquet").remove_metadata()) == plan_fields

"""State in DynamoDB: one item per client (pk "client#<name>", version N, epoch N, state S JSON).

Every write is a put_item conditional on the version this object last read or wrote
(attribute_not_exists(pk) for a new client), so a stale writer fails instead of overwriting.
Reads are strongly consistent. The table (string partition key "pk") is created by the operator;
tokensmith does not create it, and check() says so when it is missing. DynamoDB encrypts items at
rest (AWS owned or a customer KMS key)."""

from __future__ import annotations

import json

from tokensmith.errors import StateError, TokensmithError
from tokensmith.state import FencedError
from tokensmith.state.shared import MAX_CLIENTS, SharedStateStore

CLIENT = "client#"


class DynamoStateStore(SharedStateStore):
    what = "dynamodb state"

    def __init__(self, config, dynamodb, directory):
        """dynamodb: a boto3 client, or a function making one (so a missing region is reported by
        prepare(), where the daemon expects configuration errors, not by the constructor)."""
        super().__init__(directory)
        self.table = config.table
        self._db = dynamodb
        # Set by leadership: a ConditionCheck on the lease item ({"Key", "ConditionExpression",
        # "ExpressionAttributeValues"}) made part of every state write, in one transaction: a
        # replica that no longer holds the lease writes nothing (FencedError), whatever its clock says.
        self.lease_condition: dict | None = None

    @classmethod
    def from_settings(cls, settings, backends) -> "DynamoStateStore":
        store = cls(settings.state, lambda: backends.aws("dynamodb"), settings.state_dir)
        store.workers = settings.scheduler.max_workers
        return store

    @property
    def db(self):
        if not hasattr(self._db, "get_item"):
            self._db = self._db()
        return self._db

    def _call(self, what: str, client: str | None, fn):
        from tokensmith.aws import map_client_error

        try:
            return fn()
        except TokensmithError:
            raise
        except Exception as exc:
            raise map_client_error(exc, client, f"dynamodb table {self.table}: {what}", StateError) from exc

    def _read(self, client: str) -> tuple[dict | None, int]:
        item = self._call("read", client, lambda: self.db.get_item(
            TableName=self.table, Key={"pk": {"S": CLIENT + client}}, ConsistentRead=True)).get("Item")
        if not item:
            return None, 0
        return self._record(item)

    @staticmethod
    def _record(item: dict) -> tuple[dict | None, int]:
        try:
            version = int(item["version"]["N"])
            record = {"state": item["state"]["S"], "epoch": int(item.get("epoch", {}).get("N", 0)),
                      "writer": item.get("writer", {}).get("S")}
        except (KeyError, TypeError, ValueError):
            return {"state": None}, int((item.get("version") or {}).get("N", 0) or 0)
        return record, version

    def _read_all(self) -> list[tuple[str, dict | None, int]]:
        """One strongly consistent Scan, page by page: the table holds this deployment's items only
        (client#, the lease, audit#), and the client items carry their state, so nothing is read twice."""
        items = sorted(self._scan(CLIENT), key=lambda item: item["pk"]["S"])
        return [(item["pk"]["S"][len(CLIENT):], *self._record(item)) for item in items]

    def _write(self, client: str, record: dict, cas: int) -> int | None:
        from tokensmith.aws import error_code

        item = {"pk": {"S": CLIENT + client}, "version": {"N": str(cas + 1)}, "epoch": {"N": str(record["epoch"])},
                "format": {"N": str(record["format"])},
                "state": {"S": json.dumps(record["state"], separators=(",", ":"))}}
        if record.get("writer"):
            item["writer"] = {"S": record["writer"]}
        if cas:
            condition = {"ConditionExpression": "version = :v", "ExpressionAttributeValues": {":v": {"N": str(cas)}}}
        else:
            # version 0 is also an item without one (written by hand): replaceable, once
            condition = {"ConditionExpression": "attribute_not_exists(pk) OR attribute_not_exists(version)"}
        lease = self.lease_condition
        try:
            if lease is None:
                self.db.put_item(TableName=self.table, Item=item, **condition)
            else:
                self.db.transact_write_items(TransactItems=[
                    {"ConditionCheck": {"TableName": self.table, **lease}},
                    {"Put": {"TableName": self.table, "Item": item, **condition}}])
        except Exception as exc:
            code = error_code(exc)
            if code == "ConditionalCheckFailedException":
                return None
            if code == "TransactionCanceledException":
                reasons = [reason.get("Code") for reason in exc.response.get("CancellationReasons") or []]
                if reasons[:1] == ["ConditionalCheckFailed"]:
                    raise FencedError("this replica no longer holds the leader lease; nothing was written",
                                      client=client) from exc
                if reasons[1:2] == ["ConditionalCheckFailed"]:
                    return None
            from tokensmith.aws import map_client_error

            raise map_client_error(exc, client, f"dynamodb table {self.table}: write", StateError) from exc
        return cas + 1

    def _scan(self, prefix: str, limit: int = MAX_CLIENTS) -> list[dict]:
        items, start = [], None
        while len(items) < limit:
            kwargs = {"TableName": self.table, "ConsistentRead": True, "FilterExpression": "begins_with(pk, :p)",
                      "ExpressionAttributeValues": {":p": {"S": prefix}}}
            if start:
                kwargs["ExclusiveStartKey"] = start
            page = self._call("scan", None, lambda: self.db.scan(**kwargs))
            items.extend(page.get("Items") or [])
            start = page.get("LastEvaluatedKey")
            if not start:
                break
        return items[:limit]

    def _put_audit(self, key: str, record: dict) -> None:
        stamp, _, rest = key.partition("-")
        client, _, random = rest.rpartition("-")
        item = {"pk": {"S": f"audit#{stamp}#{client}#{random}"}, "record": {"S": json.dumps(record, sort_keys=True)}}
        self._call("audit write", record.get("client"), lambda: self.db.put_item(
            TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(pk)"))

    def audit_records(self) -> list[dict]:
        items = sorted(self._scan("audit#"), key=lambda item: item["pk"]["S"])
        return [json.loads(item["record"]["S"]) for item in items if "record" in item]

    def check(self) -> None:
        from tokensmith.aws import error_code

        db = self.db  # a ConfigError (no region) surfaces here, as itself
        try:
            table = db.describe_table(TableName=self.table)["Table"]
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise StateError(f"state backend dynamodb: table {self.table} does not exist (create it with a "
                                 f"string partition key named pk; tokensmith does not create it)",
                                 retryable=False) from exc
            from tokensmith.aws import map_client_error

            raise map_client_error(exc, None, f"dynamodb table {self.table}", StateError) from exc
        keys = {key["AttributeName"]: key["KeyType"] for key in table.get("KeySchema", [])}
        if keys != {"pk": "HASH"}:
            raise StateError(f"state backend dynamodb: table {self.table} must have the string partition key pk "
                             f"and no sort key", retryable=False)

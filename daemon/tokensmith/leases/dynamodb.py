"""The lease as one DynamoDB item (pk "lease") in the state table, written with a condition on
the version read -- the DynamoDB lock client's pattern: a record version number that every
renewal changes, and takeover only after it has stayed the same for the lease duration."""

from __future__ import annotations

import json

from tokensmith.aws import error_code, map_client_error
from tokensmith.leases import LeaseError, LeaseLost, LeaseRecord, record_from

KEY = "lease"


class DynamoLease:
    def __init__(self, dynamodb, table: str):
        self.dynamodb = dynamodb
        self.table = table
        self.where = f"dynamodb {table} item {KEY}"

    @classmethod
    def from_settings(cls, settings, backends) -> "DynamoLease":
        from tokensmith.aws import make_client
        from tokensmith.configview import AWS_TIMEOUT

        aws = settings.aws
        timeout = min(aws.timeout if aws is not None else AWS_TIMEOUT, 5.0, max(settings.leader.renew_every, 0.5))
        return cls(make_client("dynamodb", aws, timeout=timeout), settings.state.table)

    def fence_condition(self, holder: str, epoch: int) -> dict:
        """A ConditionCheck on this item for the state backend's writes (one transaction each): a
        state write succeeds only while the lease still names this holder and epoch -- true fencing,
        independent of any clock."""
        return {"Key": {"pk": {"S": KEY}}, "ConditionExpression": "holder = :holder AND epoch = :epoch",
                "ExpressionAttributeValues": {":holder": {"S": holder}, ":epoch": {"N": str(epoch)}}}

    def read(self) -> LeaseRecord | None:
        try:
            item = self.dynamodb.get_item(TableName=self.table, Key={"pk": {"S": KEY}}, ConsistentRead=True).get("Item")
        except Exception as exc:
            raise map_client_error(exc, None, f"leader lease {self.where}", LeaseError) from exc
        if not item:
            return None
        try:
            data = json.loads(item["lease"]["S"])
            version = int(item["version"]["N"])
        except (KeyError, ValueError, TypeError):  # unreadable: a released record; the condition still decides
            return LeaseRecord(None, 0, 0.0, int(item.get("version", {}).get("N", "1")))
        return record_from(data, version)

    def write(self, record: LeaseRecord, expected_version: int) -> LeaseRecord:
        version = expected_version + 1
        item = {"pk": {"S": KEY}, "version": {"N": str(version)}, "epoch": {"N": str(record.epoch)},
                "holder": {"S": record.holder or ""}, "lease": {"S": json.dumps(record.as_data())}}
        if expected_version:
            condition = {"ConditionExpression": "version = :v",
                         "ExpressionAttributeValues": {":v": {"N": str(expected_version)}}}
        else:
            condition = {"ConditionExpression": "attribute_not_exists(pk)"}
        try:
            self.dynamodb.put_item(TableName=self.table, Item=item, **condition)
        except Exception as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise LeaseLost(f"leader lease {self.where} was written by another replica") from exc
            raise map_client_error(exc, None, f"leader lease {self.where}", LeaseError) from exc
        return LeaseRecord(record.holder, record.epoch, record.ttl, version, record.renewed_at)

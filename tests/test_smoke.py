from creditmeter.api.credits.v1 import credits_pb2 as pb
from tests.conftest import Tenant, rid


async def test_grant_then_consume(tenant: Tenant) -> None:
    g = await tenant.admin.Grant(pb.GrantRequest(account_id="u1", amount=10, request_id=rid()))
    assert g.balance == 10
    c = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="u1", feature="text", request_id=rid())
    )
    assert c.amount == 1 and c.balance == 9

"""`rune instances`: the service instances an apiserver knows, as a table."""

from __future__ import annotations

from rune.cli.common import (
    AllNamespacesOption,
    ApiServerOption,
    CaFileOption,
    Connection,
    ContextOption,
    Job,
    NamespaceOption,
    TokenFileOption,
    connect,
    current,
    namespace_of,
)
from rune.cli.invocation import Invocation

COLUMNS = ("NAMESPACE", "SERVICE", "INSTANCE", "STATE", "HOST", "RUNNER")


def instances_command(
    namespace: NamespaceOption = None,
    all_namespaces: AllNamespacesOption = False,
    api_server: ApiServerOption = None,
    token_file: TokenFileOption = None,
    ca_file: CaFileOption = None,
    context: ContextOption = None,
) -> Job:
    """List service instances: namespace, service, instance, state, host, runner."""
    connection = Connection(api_server, token_file, ca_file, context)
    chosen = namespace_of(current(), namespace, connection)

    async def listing(inv: Invocation) -> int:
        async with connect(inv, connection) as client:
            items = await client.list_instances(chosen, all_namespaces)
        rows = [COLUMNS]
        rows += [(i.namespace, i.service, i.instance_id, i.state, i.host, i.runner)
                 for i in items]
        widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
        for row in rows:
            inv.out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
                          .rstrip() + "\n")
        return 0

    return Job(listing)

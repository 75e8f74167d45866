"""A real MCP client (the official Python SDK, `mcp` from PyPI) driving
`kvmmanager-ctl mcp` for `cargo xtask vm-test` (xtask/src/fleet_checks.rs).

Usage: mcp_client.py CTL SOCKET plain|allow AUDIT_FILE

Starts `CTL --socket SOCKET mcp` (with --allow-exec --allow-write in
`allow` mode) over stdio, lists the tools, calls each one, and prints one
JSON object: the negotiated protocol version, the tool names, and for each
call its isError flag and text. The Rust side judges the results.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, snake, camel):
    """A result member: snake_case in mcp 2.x, camelCase in 1.x."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


async def main() -> None:
    ctl, socket, mode, audit = sys.argv[1:5]
    args = ["--socket", socket, "mcp", "--audit-file", audit]
    if mode == "allow":
        args += ["--allow-exec", "--allow-write"]
    params = StdioServerParameters(command=ctl, args=args)
    calls = [
        ("list_vms", "list_vms", {}),
        ("guest_info", "guest_info", {}),
        ("metrics", "metrics", {}),
        ("processes", "processes", {"sort": "cpu", "limit": 5}),
        ("read_file", "read_file", {"path": "/etc/os-release"}),
        ("read_file_denied", "read_file", {"path": "/etc/shadow"}),
        ("read_log", "read_log", {"path": "/var/log/kvmmanager-agent.log", "lines": 5}),
        ("exec", "exec", {"command": "echo", "args": ["mcp-exec-ok"]}),
        ("write_file", "write_file", {"path": "/tmp/kvmmanager/mcp.txt", "content": "mcp-write-ok"}),
    ]
    out = {"results": {}}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["protocol"] = field(init, "protocol_version", "protocolVersion")
            out["server"] = field(init, "server_info", "serverInfo").name
            listed = await session.list_tools()
            out["tools"] = [t.name for t in listed.tools]
            out["schemas"] = {t.name: field(t, "input_schema", "inputSchema") for t in listed.tools}
            for key, name, arguments in calls:
                res = await session.call_tool(name, arguments)
                text = "".join(getattr(c, "text", "") for c in res.content)
                out["results"][key] = {"isError": bool(field(res, "is_error", "isError")), "text": text}
    print(json.dumps(out))


asyncio.run(main())

"""Cross-process SetInstruction over real DDS (loopback): a server process and a client in the test."""
from pathlib import Path

from so101_common.graph import SET_INSTRUCTION_SERVICE
from so101_common.testing import spin_until, wait_until_answering
from so101_interfaces.srv import SetInstruction

SERVER = str(Path(__file__).parent / "nodes" / "instruction_server.py")


def call(node, client, text: str) -> SetInstruction.Response:
    future = client.call_async(SetInstruction.Request(instruction=text))
    assert spin_until(node, future.done, timeout=10.0), "no response from the server"
    return future.result()


def test_set_instruction_across_processes(node_process, ros_node):
    server = node_process(SERVER)
    client = ros_node.create_client(SetInstruction, SET_INSTRUCTION_SERVICE)
    # An empty instruction is refused and changes nothing: its answer proves the replies reach this client.
    assert wait_until_answering(ros_node, client, SetInstruction.Request(instruction=" "), 20.0), server.output()

    ok = call(ros_node, client, "  grasp the red block and put it in the box ")
    assert ok.accepted and "'grasp the red block and put it in the box'" in ok.message

    empty = call(ros_node, client, "   ")
    assert not empty.accepted and "empty" in empty.message

    too_long = call(ros_node, client, "a" * 513)
    assert not too_long.accepted and "512" in too_long.message

    limit = call(ros_node, client, "b" * 512)
    assert limit.accepted
    assert server.alive()

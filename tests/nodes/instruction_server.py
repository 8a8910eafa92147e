"""A minimal SetInstruction server, run as its own process by test_instruction_service.py.

It serves so101_common.instruction.validate_instruction, the validation the policy node uses, so the test
exercises the real service type over DDS between two processes.
"""
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from so101_common.graph import SET_INSTRUCTION_SERVICE
from so101_common.instruction import validate_instruction
from so101_interfaces.srv import SetInstruction


class InstructionServer(Node):
    def __init__(self) -> None:
        super().__init__("instruction_server")
        self.current = ""
        self.create_service(SetInstruction, SET_INSTRUCTION_SERVICE, self.on_request)
        self.get_logger().info(f"serving {SET_INSTRUCTION_SERVICE}")

    def on_request(self, request: SetInstruction.Request, response: SetInstruction.Response):
        accepted, cleaned, message = validate_instruction(request.instruction)
        if accepted:
            self.current = cleaned
            message = f"{message}: {cleaned!r}"
        response.accepted, response.message = accepted, message
        return response


def main() -> None:
    rclpy.init()
    node = InstructionServer()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()

"""Joy-Con (or any joystick) -> sensor_msgs/Joy through Linux evdev, for the pip environment where joy_node is missing.

Publishes on the graph's Joy topic with joy_node's numbering, scaling, deadzone and autorepeat (see joy_evdev), so
so101_teleop's Joy-Con map works unchanged. A thread waits on the device; each evdev report that changes the state
is published at once, and the state is republished at ``autorepeat_rate`` while nothing changes (the teleop's
deadman needs a steady stream). A device that is missing, unreadable or unplugged is logged and looked for again
every ``reconnect_s``; nothing is published meanwhile, so the teleop stops on its Joy timeout.
``replay_file`` plays an ``evtest`` log instead of a device (checking a button map, tests, demos).
"""
from __future__ import annotations

import select
import sys
import threading
import time
from pathlib import Path

from rclpy.node import Node
from sensor_msgs.msg import Joy

from so101_common.graph import JOY_TOPIC
from so101_common.spin import spin_node
from so101_teleop.joy_evdev import EV_ABS, EvdevError, Feed, JoyLayout, JoyState, parse_evtest
from so101_teleop.params import declare as declare_parameter

JOYCON_RIGHT = "Nintendo Switch Right Joy-Con"


class JoyEvdevNode(Node):
    def __init__(self) -> None:
        super().__init__("joy_node")

        def declare(name: str, default, description: str):
            return declare_parameter(self, name, default, description)

        self.device_path = str(declare("device", "", "input device path (/dev/input/eventN or "
                                       "/dev/input/by-id/...); empty: the first device named device_name"))
        self.device_name = str(declare("device_name", JOYCON_RIGHT, "exact input device name (as evtest lists "
                                       "it) used when device is empty"))
        self.deadzone = float(declare("deadzone", 0.05, "axis deadzone in [0, 1), as joy_node's"))
        autorepeat_rate = float(declare("autorepeat_rate", 20.0, "republish the unchanged state at this rate "
                                        "(Hz; 0: only on changes), as joy_node's"))
        self.reconnect_s = float(declare("reconnect_s", 1.0, "wait between looks for a missing device (s)"))
        replay_file = str(declare("replay_file", "", "an evtest log to play instead of a device"))
        self.replay_subscribers = int(declare("replay_subscribers", 1, "start a replay once this many Joy "
                                              "subscribers are matched (so nothing is played to nobody)"))
        if not 0.0 <= self.deadzone < 1.0:
            raise ValueError(f"parameter deadzone must be in [0, 1), got {self.deadzone}")
        if not 0.0 <= autorepeat_rate <= 1000.0:
            raise ValueError(f"parameter autorepeat_rate must be in 0..1000 Hz, got {autorepeat_rate}")
        if self.reconnect_s <= 0:
            raise ValueError(f"parameter reconnect_s must be > 0, got {self.reconnect_s}")
        if self.replay_subscribers < 0:
            raise ValueError(f"parameter replay_subscribers must be >= 0, got {self.replay_subscribers}")
        self.repeat_s = 1.0 / autorepeat_rate if autorepeat_rate > 0 else None
        self.recording = None
        if replay_file:
            path = Path(replay_file).expanduser()
            if not path.is_file():
                raise ValueError(f"parameter replay_file: {path} does not exist")
            self.recording = parse_evtest(path.read_text(errors="replace"), str(path))
        self.published = 0
        self.pub = self.create_publisher(Joy, JOY_TOPIC, 10)
        self._stop = threading.Event()
        target = self._replay if self.recording is not None else self._run_device
        self._thread = threading.Thread(target=target, name="joy-evdev", daemon=True)
        self._thread.start()
        device = self.device_path or f"device named {self.device_name!r}"
        source = f"replay of {replay_file}" if replay_file else device
        self.get_logger().info(f"publishing {JOY_TOPIC} from {source} (deadzone {self.deadzone:g}, "
                               f"autorepeat {autorepeat_rate:g} Hz)")

    def _publish(self, state: JoyState) -> None:
        msg = Joy(axes=[float(a) for a in state.axes], buttons=list(state.buttons))
        msg.header.frame_id = "joy"
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub.publish(msg)
        self.published += 1

    # -- a real device
    def _open(self):
        """The device to read, or None (logged) when it is not there or not readable."""
        import evdev

        try:
            if self.device_path:
                return evdev.InputDevice(self.device_path)
            for path in evdev.list_devices():
                try:
                    device = evdev.InputDevice(path)
                except OSError:
                    continue
                if device.name == self.device_name:
                    return device
                device.close()
        except PermissionError as exc:
            self.get_logger().error(f"cannot read {exc.filename}: add yourself to the 'input' group or a udev rule "
                                    "(docs/teleop_recording.md)", throttle_duration_sec=10.0)
            return None
        except OSError as exc:
            self.get_logger().warning(f"input device {self.device_path}: {exc.strerror}", throttle_duration_sec=10.0)
            return None
        self.get_logger().warning(f"no readable input device named {self.device_name!r} (paired and connected? "
                                  "in the 'input' group? `evtest` lists the names)", throttle_duration_sec=10.0)
        return None

    def _run_device(self) -> None:
        while not self._stop.is_set():
            device = self._open()
            if device is None:
                self._stop.wait(self.reconnect_s)
                continue
            try:
                self._serve(device)
            except OSError as exc:
                self.get_logger().error(f"{device.path} ({device.name}) lost: {exc.strerror or exc}; "
                                        "looking for it again")
            except EvdevError as exc:
                self.get_logger().error(f"{device.path}: {exc}")
                self._stop.wait(self.reconnect_s)
            finally:
                device.close()

    def _serve(self, device) -> None:
        layout = JoyLayout.from_evdev(device.name, device.capabilities(absinfo=True))
        state = JoyState(layout, self.deadzone)

        def resync() -> None:
            values = {code: info.value for code, info in device.capabilities(absinfo=True).get(EV_ABS, [])}
            state.resync(device.active_keys(), values)

        resync()
        self.get_logger().info(f"opened {device.path} ({device.name}): {len(layout.buttons)} buttons, "
                               f"{layout.n_axes} axes")
        self._publish(state)
        last = time.monotonic()
        while not self._stop.is_set():
            wait = 0.2 if self.repeat_s is None else max(0.0, last + self.repeat_s - time.monotonic())
            ready, _, _ = select.select([device.fd], [], [], wait)
            publish = False
            if ready:
                for event in device.read():
                    outcome = state.feed(event.type, event.code, event.value)
                    if outcome is Feed.RESYNC:
                        resync()
                    publish |= outcome is not Feed.NOTHING
            if publish or (self.repeat_s is not None and time.monotonic() - last >= self.repeat_s):
                self._publish(state)
                last = time.monotonic()

    # -- an evtest log
    def _replay(self) -> None:
        """Play the log in its own timing, once replay_subscribers are matched (so nothing is played to nobody)."""
        recording = self.recording
        state = JoyState(recording.layout, self.deadzone)
        state.resync([], recording.initial_abs)
        while self.pub.get_subscription_count() < self.replay_subscribers:
            if self._stop.wait(0.05):
                return
        start_wall = time.monotonic()
        start_rec = recording.events[0].time if recording.events else 0.0
        last = start_wall
        pending = list(recording.events)
        finished = False
        while not self._stop.is_set():
            now = time.monotonic()
            publish = False
            while pending and pending[0].time - start_rec <= now - start_wall:
                event = pending.pop(0)
                publish |= state.feed(event.type, event.code, event.value) is not Feed.NOTHING
            if publish or (self.repeat_s is not None and now - last >= self.repeat_s):
                self._publish(state)
                last = now
            if not pending and not finished:
                finished = True
                self.get_logger().info(f"replay finished: {self.published} Joy messages published")
                if self.repeat_s is None:
                    return
            self._stop.wait(0.002)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(2.0)
        return f"{self.published} Joy messages published"


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(JoyEvdevNode, "joy_evdev_node", args if args is not None else sys.argv,
                       cleanup=JoyEvdevNode.stop))


if __name__ == "__main__":
    main()

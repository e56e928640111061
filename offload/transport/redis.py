"""A Redis transport that takes a message and records its lease in one step.

kombu's Redis transport takes a message with ``BRPOP`` and records it as
unacknowledged (the ``unacked`` hash and the ``unacked_index`` sorted set
that ``visibility_timeout`` sweeps) only afterwards, in a second command sent
by the consumer. A consumer whose link is cut, or which is killed, between the
two leaves the message nowhere: not queued, not unacknowledged, never
redelivered. This transport is kombu's, with that one step changed:

* **The take is a Lua script** (:data:`TAKE`) that pops the first message of
  the consumed queues, in kombu's key order (priority first, then the
  round-robin order of the queues), and, in the same server-side step, stores
  it in ``unacked`` and its delivery time in ``unacked_index``. A script runs
  atomically: after it, the message is in a queue or leased, never nowhere.
  The lease has kombu's exact format, so kombu's ``restore_visible``, the
  shutdown restore and offload's lease renewal work on it unchanged.

* **Waiting is not polling, and flowing is one round trip.** A script
  cannot block, so an idle consumer waits with ``BRPOP`` on one *wake list*
  per queue (``<queue>\\x06\\x16wake``) and then runs the take. A queue's
  wake list holds one token at most: a publish pushes one if there is none,
  which wakes one waiting consumer; a take that leaves messages behind
  pushes one if there is none (for another consumer that waits while this
  one is busy), and a take that finds the queue empty drops it (it would
  only wake a consumer for nothing). While messages flow a consumer takes
  again at once, one script call per message (kombu's costs a ``BRPOP`` and
  a pipeline); when its take emptied the queues it waits first, so keeping
  up with a producer costs a wait and a take per message, as kombu's
  ``BRPOP`` and pipeline do. Messages published by kombu's stock transport
  carry no token: the wait has the stock ``brpop_timeout`` (1 s), after
  which the take runs anyway, which is also how often the stock transport
  reissues its own ``BRPOP``.

  Rejected alternatives: ``BLMOVE`` into a per-consumer list is atomic and
  blocking but takes one source key, while a kombu consumer reads several
  queues with four priority keys each; Redis Streams would change the
  storage format, so stock producers, Flower's queue lengths and a mixed
  fleet during an upgrade would stop working; client-side-caching
  invalidations (``CLIENT TRACKING BCAST``) need no producer cooperation but
  track key *prefixes*, so result keys and every take would wake every
  consumer.

* **A failed acknowledgement frees its prefetch slot.** kombu frees the slot
  only after the ``unacked`` entries are removed; when that raises (a cut
  link: ``Couldn't ack ... TimeoutError``) the tag stays held and, with a
  prefetch of one, the worker stops consuming for good. Here the slot is
  freed whatever happens and the removal is retried at the next
  acknowledgement, lease renewal or restore sweep; if the process dies
  first, the lease brings the message back (at least once, never lost).

* **What a closed channel held goes back once Redis answers again.** When
  a channel closes, kombu puts the messages it holds unacknowledged back on
  their queue; when Redis is the reason it closes (killed, restarted, cut
  off), that restore fails and the messages stay leased until the
  visibility timeout, though nothing in this process will run them: Celery
  drops the requests it had received but not started when it reconnects.
  Here the leases the close could not restore (and the acknowledgements it
  could not send) are kept in the process (:data:`orphans`) and settled by
  the next channel of the process that reaches the same Redis, at its
  first sweep: put back at the head of their queue (or removed, for a
  message acknowledged meanwhile), unless the lease was taken again since.

Everything else is kombu's: priorities (the same per-priority list names),
fanout over pub/sub (remote control, ``celery inspect``, events), the event
loop integration and its health checks, ``global_keyprefix``, queue expiry.

URLs: ``offload-redis://host:port/db`` selects it from plain Celery or kombu
(``offload-redis`` is the kombu transport alias that :mod:`offload.transport`
registers; an offload app also reads ``offload+redis://`` as that, see
:mod:`offload.config`); offload apps use it for ``redis://`` broker URLs by
default through Celery's ``broker_transport`` setting.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

__all__ = ["Channel", "Orphans", "PUT", "QoS", "Transport", "TAKE", "orphans"]

logger = logging.getLogger("offload.transport.redis")

#: The atomic take. KEYS: unacked_index, unacked, then n queue keys in take
#: order, then n wake lists (the wake list of each queue key's queue, in the
#: same order). ARGV: now (the lease's delivery time, seconds), n, then one
#: character per queue key: "1" to record a lease, "0" for a no-ack consumer.
#: Returns {more, index of the queue key, message}, or {more} when every key
#: was empty; ``more`` is 1 if a consumed queue still holds messages after
#: the take (the caller takes again rather than waits).
#:
#: The message is never re-encoded (Lua's cjson would turn [] into {} and
#: round large integers): the lease is written as ``[<message>, exchange,
#: routing key]`` by concatenation, the format kombu's QoS writes and reads.
#: Only the message's ``properties`` object is decoded when kombu wrote it
#: (its last member): decoding a whole Celery message costs the server about
#: as much as the rest of the take. The slice is decoded only if it is valid
#: JSON on its own, which a slice ending at the message's last member's end
#: is exactly when it starts at that member's value; otherwise (another
#: producer's layout, a header named "properties") the whole message is.
#:
#: Wake tokens: a queue that still holds messages keeps one token (for a
#: consumer that waits on it while this one is busy), a queue found empty
#: keeps none (a token then would only wake a consumer for nothing).
TAKE = """
local n = tonumber(ARGV[2])

local function properties_of(item)
  local at = string.find(item, '"properties": {', 1, true)
  if at and string.sub(item, at - 1, at - 1) ~= '\\\\' then
    local ok, props = pcall(cjson.decode, string.sub(item, at + 14, -2))
    if ok and type(props) == 'table' then return props end
  end
  local ok, message = pcall(cjson.decode, item)
  if ok and type(message) == 'table' and type(message.properties) == 'table' then
    return message.properties
  end
  return nil
end

local taken, item
for i = 1, n do
  item = redis.call('RPOP', KEYS[2 + i])
  if item then
    taken = i
    break
  end
end

if taken and string.sub(ARGV[3], taken, taken) == '1' then
  local props = properties_of(item)
  if props then
    local tag = props.delivery_tag
    local info = props.delivery_info
    if type(info) ~= 'table' then info = {} end
    if type(tag) == 'string' or type(tag) == 'number' then
      local exchange = info.exchange
      local routing_key = info.routing_key
      if exchange == nil then exchange = '' end
      if routing_key == nil then routing_key = '' end
      redis.call('HSET', KEYS[2], tag,
        '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', KEYS[1], ARGV[1], tag)
    end
  end
end

local wakes, left = {}, {}
for i = 1, n do
  local wake = KEYS[2 + n + i]
  if left[wake] == nil then
    table.insert(wakes, wake)
    left[wake] = false
  end
  if not left[wake] and redis.call('LLEN', KEYS[2 + i]) > 0 then
    left[wake] = true
  end
end
local more = 0
for _, wake in ipairs(wakes) do
  if left[wake] then
    more = 1
    if redis.call('EXISTS', wake) == 0 then
      redis.call('LPUSH', wake, 1)
    end
  else
    redis.call('DEL', wake)
  end
end

if taken then
  return {more, taken, item}
end
return {more}
"""

#: The publish: the message, and a wake token if its queue has none (one
#: token wakes one waiting consumer; a second message finds the first token
#: already popped by it, or still there with no consumer waiting). KEYS: the
#: queue's list for the message's priority, the queue's wake list. ARGV: the
#: message.
PUT = """
redis.call('LPUSH', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('LPUSH', KEYS[2], 1)
end
"""

# The channel's take connection alternates between two commands in flight.
_TAKING = "take"
_WAITING = "wait"


def _delivery_tag(payload: Any) -> Any:
    try:
        return payload["properties"]["delivery_tag"]
    except (TypeError, KeyError):
        return None


class Orphans:
    """Leases that closed channels of this process could not settle.

    Keyed by the channel's *lease scope* (the Redis it reached and its
    ``unacked`` keys), each held delivery tag maps to what is owed: ``True``
    to put the message back on its queue (it was held, unacknowledged, when
    its channel closed), ``False`` to remove the lease (it was acknowledged
    while Redis could not be told); and to the time its channel let go of
    it: a lease renewed or taken again after that is another holder's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Any, dict[Any, tuple[bool, float]]] = {}

    def hold(self, scope: Any, tags: dict[Any, tuple[bool, float]]) -> None:
        """Keep ``tags`` ({tag: (restore?, let go at)}) for the next channel on ``scope``."""
        if tags:
            with self._lock:
                self._held.setdefault(scope, {}).update(tags)

    def take(self, scope: Any) -> dict[Any, tuple[bool, float]]:
        """Remove and return what is held for ``scope`` (the caller holds back what it cannot settle)."""
        with self._lock:
            return self._held.pop(scope, None) or {}

    def held(self, scope: Any) -> dict[Any, tuple[bool, float]]:
        """What is held for ``scope`` now (a copy)."""
        with self._lock:
            return dict(self._held.get(scope) or {})

    def clear(self) -> None:
        """Forget everything (a forked child: the messages are its parent's)."""
        with self._lock:
            self._held.clear()


#: The process's leases left unsettled by closed channels (see :class:`Orphans`).
orphans = Orphans()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=orphans.clear)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS for messages whose lease the take already wrote.

    Also keeps an acknowledgement that could not reach Redis from holding a
    prefetch slot: see the module's docstring.
    """

    # kombu sets these None in its class body and fills them in __init__.
    _delivered: dict[Any, Any]  # type: ignore[assignment]
    _dirty: set[Any]  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Tags whose lease the take script wrote, not yet appended.
        self.leased: set[Any] = set()
        #: Tags acknowledged locally whose lease removal failed, oldest first.
        self.pending_acks: dict[Any, None] = {}
        #: When the channel closed and let go of its messages (None while open).
        self.released_at: float | None = None

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.leased:
            self.leased.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            # Delivered some other way (a fanout message, a basic_get on a
            # queue taken without a lease): kombu's own recording.
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self._remove_lease(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if not requeue:
            self._remove_lease(delivery_tag)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except self.channel.connection_errors:
            # The lease is still there: the next sweep that reaches Redis,
            # on this channel or the next, puts it back.
            orphans.hold(self.channel.lease_scope, {delivery_tag: (True, time())})
            logger.warning("could not requeue %s now (Redis unreachable); it goes back as soon as "
                           "Redis answers", delivery_tag, exc_info=True)
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def _remove_lease(self, delivery_tag: Any) -> None:
        try:
            self.drop_lease(delivery_tag)
        finally:
            # Free the prefetch slot whatever Redis answered: the message is
            # done here, and its lease (if the removal never lands) only
            # brings it back elsewhere.
            virtual.QoS.ack(self, delivery_tag)

    def drop_lease(self, delivery_tag: Any) -> None:
        """Remove the lease of ``delivery_tag`` now, or as soon as Redis answers."""
        try:
            self.flush_pending_acks()
            self._remove_from_indices(delivery_tag).execute()
        except self.channel.connection_errors:
            if self.channel.closed:
                # Acknowledged after its channel closed (a task that ran on
                # through the outage): the next channel removes the lease.
                orphans.hold(self.channel.lease_scope, {delivery_tag: (False, self.released_at or time())})
                logger.warning("could not acknowledge %s now (Redis unreachable); "
                               "the next connection will", delivery_tag)
                return
            self.pending_acks[delivery_tag] = None
            logger.warning("could not acknowledge %s now (Redis unreachable); "
                           "retrying on the next acknowledgement or sweep",
                           delivery_tag, exc_info=True)

    def flush_pending_acks(self) -> None:
        """Remove the leases of acknowledgements that failed earlier.

        Raises the connection error if Redis is still unreachable; the tags
        stay pending.
        """
        if not self.pending_acks:
            return
        tags = list(self.pending_acks)
        with self.pipe_or_acquire() as pipe:
            for tag in tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()
        for tag in tags:
            self.pending_acks.pop(tag, None)

    def held_tags(self) -> list[Any]:
        """Delivery tags this channel holds: delivered and not acknowledged."""
        dirty = self._dirty
        return [tag for tag in self._delivered if tag not in dirty]

    def renew_leases(self) -> int:
        """Move the delivery time of every held message to now.

        Flushes failed acknowledgements first. Returns how many leases were
        renewed. Raises the connection error when Redis is unreachable.
        """
        self.flush_pending_acks()
        tags = self.held_tags()
        if not tags:
            return 0
        now = time()
        with self.channel.conn_or_acquire() as client:
            # xx: only entries still leased (one acked meanwhile stays gone).
            client.zadd(self.unacked_index_key, {tag: now for tag in tags}, xx=True)
        return len(tags)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        try:
            self.flush_pending_acks()
        except self.channel.connection_errors:
            logger.debug("pending acknowledgements not flushed", exc_info=True)
        try:
            self.settle_orphans()
        except self.channel.connection_errors:
            logger.debug("leases of closed channels not settled", exc_info=True)
        super().restore_visible(start=start, num=num, interval=interval)

    def restore_unacked(self, client: Any = None) -> None:
        """Put every held message back on its queue (kombu's, at close).

        What Redis cannot be reached for, and the acknowledgements that
        never reached it, are left to the next channel of the process
        (:data:`orphans`) instead of to the visibility timeout.
        """
        released_at = self.released_at = time()
        left = list(self._delivered)
        self._delivered.clear()
        owed = {tag: (False, released_at) for tag in self.pending_acks}
        try:
            self.flush_pending_acks()
            owed.clear()
            with self.channel.conn_or_acquire(client) as client:
                while left:
                    self.restore_by_tag(left[0], client=client)
                    left.pop(0)
        except self.channel.connection_errors:
            owed.update((tag, (True, released_at)) for tag in left)
            orphans.hold(self.channel.lease_scope, owed)
            self.pending_acks.clear()
            logger.warning("Redis is unreachable: %d message(s) this connection held go back to their "
                           "queue as soon as a new connection reaches it", len(owed))

    def settle_orphans(self) -> int:
        """Settle the leases closed channels of this process left on this Redis.

        Each goes back to the head of its queue (or is removed, if its
        message was acknowledged), unless it was taken or renewed since its
        channel let go of it. Returns how many were settled. Raises the
        connection error if Redis is unreachable; what is left stays held.
        """
        scope = self.channel.lease_scope
        owed = orphans.take(scope)
        if not owed:
            return 0
        settled = 0
        try:
            with self.channel.conn_or_acquire() as client:
                for tag, (restore, released_at) in list(owed.items()):
                    self._settle(client, tag, restore, released_at)
                    del owed[tag]
                    settled += 1
        finally:
            orphans.hold(scope, owed)
        logger.info("settled %d message(s) held when the Redis connection was lost: back on their queue "
                    "unless acknowledged or taken again since", settled)
        return settled

    def _settle(self, client: Any, tag: Any, restore: bool, released_at: float) -> None:
        def settle(pipe: Any) -> None:
            score = pipe.zscore(self.unacked_index_key, tag)
            if score is None or score > released_at:
                # Restored already (the visibility sweep), or leased again
                # since: another holder's now. (Scores are the holders'
                # clocks: this trusts them to agree within a take's time.)
                pipe.multi()
                return
            raw = pipe.hget(self.unacked_key, tag) if restore else None
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if raw:
                message, exchange, routing_key = loads(bytes_to_str(raw))
                self.channel._do_restore_message(message, exchange, routing_key, pipe)

        client.transaction(settle, self.unacked_key, self.unacked_index_key)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with the atomic take (see the module's docstring)."""

    QoS = QoS

    wake_suffix = "wake"
    _take_phase: str | None = None
    _take_keys: list[tuple[str, str, bool]] = []
    _take_queues: list[str] = []
    #: The last take left the consumed queues empty: the next fetch waits
    #: first (a take then would find nothing: one round trip for nothing).
    _wait_next = False

    #: Take plans cached per (queues, lease flags): at most this many.
    _TAKE_PLANS_MAX = 64

    # kombu's: the connection polled (False or None when none is), and when
    # the BRPOP was sent (None in kombu's class body, a float once sent).
    _in_poll: Any
    _brpop_sent_at: float | None  # type: ignore[assignment]

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        # Before kombu's __init__, which may consume nothing yet but reads these.
        self._no_ack_queues: dict[str, bool] = {}
        self._get_records = True
        self._take_plans: dict[tuple[tuple[str, ...], tuple[bool, ...]], Any] = {}
        connection.check_not_silent()
        try:
            super().__init__(connection, **kwargs)  # connects and pings
        except kombu_redis.exceptions.TimeoutError:
            connection.mark_silent()
            raise
        #: Which leases this channel's are (see :class:`Orphans`): read now,
        #: as the connection forgets its URL when it closes.
        self.lease_scope: tuple[str, str, str, str] = (
            connection.client.as_uri(), self.global_keyprefix, self.unacked_key, self.unacked_index_key)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A worker that loses Redis closes its connection twice (Celery's
        # collect, then close); by the second time kombu has dropped the
        # channel's pools and the transport's client, and the restore of the
        # unacked messages on close then builds a pool from nothing: an
        # AttributeError, which Celery takes for an unrecoverable error and
        # the worker exits. A connection error instead is what that close
        # ignores; the messages stay leased until the visibility timeout.
        if self.connection.client is None:
            raise kombu_redis.redis.exceptions.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)

    # Keys ---------------------------------------------------------------

    def wake_key(self, queue: str) -> str:
        """The list of wake tokens of ``queue`` (one per published message)."""
        return f"{queue}{self.sep}{self.wake_suffix}"

    def _script_keys(self, keys: list[str]) -> list[str]:
        # kombu's prefixed client prefixes only the first key of an EVALSHA;
        # the others are prefixed here (as kombu does for its own scripts).
        prefix = self.global_keyprefix
        return [keys[0]] + [prefix + key for key in keys[1:]] if prefix else keys

    def _take_plan(self, queues: list[str], records: list[bool],
                   ) -> tuple[list[tuple[str, str, bool]], list[str], str]:
        """(queue, key, lease it?) per key in take order, the script's KEYS
        (unprefixed) and its lease flags; built once per set of queues."""
        cache_key = (tuple(queues), tuple(records))
        plan = self._take_plans.get(cache_key)
        if plan is None:
            taken = [(queue, self._q_for_pri(queue, pri), record)
                     for pri in self.priority_steps for queue, record in zip(queues, records)]
            keys = [self.unacked_index_key, self.unacked_key,
                    *(key for _, key, _ in taken), *(self.wake_key(queue) for queue, _, _ in taken)]
            flags = "".join("1" if record else "0" for _, _, record in taken)
            if len(self._take_plans) >= self._TAKE_PLANS_MAX:
                self._take_plans.clear()  # queues came and went (reply queues)
            plan = self._take_plans[cache_key] = (taken, keys, flags)
        return plan

    _sync_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, keeping one client per pool instead of building one per call.

        A redis-py client is a thin handle on the pool (each command borrows a
        connection from it) that costs tens of µs to build (its table of
        reply callbacks), and kombu builds one for every publish.
        """
        if client:
            yield client
            return
        pool = self.pool
        cached = self._sync_client
        if cached is None or cached.connection_pool is not pool:  # a new pool after a reconnect
            cached = self._sync_client = self._create_client()
        yield cached

    @kombu_redis.cached_property
    def _put_script(self) -> Any:
        return self._create_client().register_script(PUT)

    @kombu_redis.cached_property
    def _take_script(self) -> Any:
        return self._create_client().register_script(TAKE)

    # Consumers ----------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._no_ack_queues[queue] = bool(no_ack)
        if orphans.held(self.lease_scope):
            # A consumer starting again after a lost connection: what the
            # old one held goes back before this one takes anything.
            try:
                self.qos.settle_orphans()
            except self.connection_errors:
                logger.debug("leases of closed channels not settled", exc_info=True)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._get_records = not no_ack
        try:
            return super().basic_get(queue, no_ack=no_ack, **kwargs)
        finally:
            self._get_records = True

    def _records(self, queue: str) -> bool:
        return self.ack_emulation and not self._no_ack_queues.get(queue, False)

    # The synchronous take (basic_get) -------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        # ``timeout``: in kombu's base signature; no take here blocks, as in kombu's Redis channel.
        if not self.ack_emulation:
            return super()._get(queue)
        record = self._get_records
        taken, keys, flags = self._take_plan([queue], [record])
        with self.conn_or_acquire() as client:
            reply = self._take_script(keys=self._script_keys(keys),
                                      args=[time(), len(taken), flags], client=client)
            self._maybe_update_queues_expire(client, queue)
        if len(reply) < 3:
            raise kombu_redis.Empty()
        payload = loads(bytes_to_str(reply[2]))
        if record:
            self.qos.leased.add(_delivery_tag(payload))
        return payload

    # The event loop's take: kombu's BRPOP hooks, two commands in turn -------

    def _send(self, *args: Any) -> None:
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*args)

    def _consumed_queues(self) -> list[str]:
        # Read at every command, as kombu's BRPOP is rebuilt at every start:
        # consumers come and go (a reply queue per remote-control call).
        return list(self._queue_cycle.consume(len(self.active_queues)))

    def _send_take(self) -> None:
        queues = self._take_queues = self._consumed_queues()
        if not queues:
            return
        self._take_keys, keys, flags = self._take_plan(queues, [self._records(q) for q in queues])
        prefix = self.global_keyprefix
        if prefix:
            keys = [prefix + key for key in keys]  # sent raw: nothing prefixes them
        self._take_phase = _TAKING
        self._send("EVALSHA", self._take_script.sha, len(keys), *keys,
                   time(), len(self._take_keys), flags)

    def _send_wait(self) -> None:
        queues = self._take_queues = self._consumed_queues()
        if not queues:
            return
        prefix = self.global_keyprefix
        keys = [prefix + self.wake_key(queue) for queue in queues]
        self._take_phase = _WAITING
        self._send("BRPOP", *keys, self.brpop_timeout or 0)

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self.ack_emulation:
            return super()._brpop_start(timeout)
        if self._wait_next:
            self._send_wait()
        else:
            self._send_take()

    def _brpop_read(self, **options: Any) -> bool:
        if not self.ack_emulation:
            return super()._brpop_read(**options)
        phase = self._take_phase
        connection = self.client.connection
        try:
            reply = self.client.parse_response(
                connection, "BRPOP" if phase == _WAITING else "EVALSHA", **options)
        except kombu_redis.exceptions.NoScriptError:
            # The server lost its scripts (restarted, SCRIPT FLUSH): load and retry.
            self._in_poll = None
            self.client.script_load(TAKE)
            self._send_take()
            raise kombu_redis.Empty() from None
        except self.connection_errors:
            self._in_poll = None
            connection.disconnect()
            raise
        except BaseException:
            self._in_poll = None
            raise
        self._in_poll = None
        if phase == _WAITING:
            if self._closing:
                if reply:  # hand the token on to another consumer
                    with self.conn_or_acquire() as client:
                        client.lpush(bytes_to_str(reply[0]), 1)
                raise kombu_redis.Empty()
            # Woken by a token or timed out (a stock producer pushes no
            # token): either way, take.
            self._wait_next = False
            self._flush_brpop_reauth()
            self._send_take()
            raise kombu_redis.Empty()
        if len(reply) < 3:
            self._wait_next = False
            if self._closing:
                raise kombu_redis.Empty()
            self._flush_brpop_reauth()
            self._send_wait()
            raise kombu_redis.Empty()
        self._wait_next = not int(reply[0])
        index, item = int(reply[1]), reply[2]
        # As sent: whether the script leased it is what counts.
        queue, key, recorded = self._take_keys[index - 1]
        payload = loads(bytes_to_str(item))
        tag = _delivery_tag(payload)
        if self._closing:
            self._give_back(tag, key, item, recorded)
            raise kombu_redis.Empty()
        self._queue_cycle.rotate(queue)
        if recorded:
            self.qos.leased.add(tag)
        try:
            self.connection._deliver(payload, queue)
        finally:
            if recorded and tag in self.qos.leased:
                # Nobody appended it (its consumer went no-ack or away):
                # drop the lease rather than redeliver it later.
                self.qos.leased.discard(tag)
                self.qos.drop_lease(tag)
            self._flush_brpop_reauth()
        return True

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "BRPOP" and self.ack_emulation:
            # Read whatever is in flight as what it is (a take or a wait);
            # a leased message read here is delivered, not dropped.
            return self._brpop_read(**options)
        return super()._poll_error(type, **options)

    def _do_restore_message(self, payload: Any, exchange: Any, routing_key: Any,
                            pipe: Any, leftmost: bool = False) -> None:
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        # A restored message wakes a waiting consumer, as a published one does.
        try:
            queues = self._lookup(exchange, routing_key)
        except Exception:  # kombu logged it already (the message was not restored)
            return
        for queue in queues:
            self._push_wake(pipe, self.wake_key(queue))

    def _push_wake(self, pipe: Any, wake: str) -> None:
        # One token at most, as the publish script keeps it. kombu's
        # prefixed pipeline does not prefix LTRIM's key.
        pipe.lpush(wake, 1)
        pipe.ltrim(self.global_keyprefix + wake, 0, 0)

    def _give_back(self, tag: Any, key: str, item: bytes, recorded: bool) -> None:
        # A message taken while the channel closes goes back to the head of
        # its queue (the right end, where the take pops).
        if recorded:
            try:
                self.qos.restore_by_tag(tag)
            except self.connection_errors:
                orphans.hold(self.lease_scope, {tag: (True, time())})
        else:
            with self.conn_or_acquire() as client:
                client.rpush(key, item)

    # Producers ----------------------------------------------------------

    _put_pipeline: Any = None

    @contextmanager
    def pipelined_puts(self) -> Iterator[None]:
        """Publish what is published inside in one round trip, when the block ends.

        What ``map`` sends its chunks through: a publish inside only queues
        its script call on a pipeline, sent (one ``EVALSHA`` each, in order)
        when the block ends without an error. If the block raises, nothing
        queued is sent; if sending raises, the messages may or may not have
        reached Redis, as when a single publish fails. Nested blocks send
        with the outermost.
        """
        if self._put_pipeline is not None or not self.ack_emulation:
            yield
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
        self._put_pipeline = pipe
        self._tables = {}
        try:
            yield
            self._put_pipeline = None
            if len(pipe):
                try:
                    pipe.execute()
                except kombu_redis.exceptions.TimeoutError:
                    self.connection.mark_silent()
                    raise
        finally:
            self._put_pipeline = None
            self._tables = None
            pipe.reset()

    _tables: dict[str, Any] | None = None

    def get_table(self, exchange: str) -> Any:
        # kombu reads an exchange's bindings from Redis at every publish; in
        # a pipelined block, once per exchange (or each publish would still
        # cost a round trip).
        tables = self._tables
        if tables is None:
            return super().get_table(exchange)
        table = tables.get(exchange)
        if table is None:
            table = tables[exchange] = super().get_table(exchange)
        return table

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if not self.ack_emulation:
            return super()._put(queue, message, **kwargs)
        pri = self._get_message_priority(message, reverse=False)
        key = self._q_for_pri(queue, pri)
        wake = self.wake_key(queue)
        body = kombu_redis.dumps(message)
        expires = self._expires.get(queue) if self._expires else None
        pipe = self._put_pipeline
        if pipe is not None:  # queued: pipelined_puts() sends it
            self._put_script(keys=self._script_keys([key, wake]), args=[body], client=pipe)
            if expires:
                for p in self.priority_steps:
                    pipe.pexpire(self._q_for_pri(queue, p), expires)
                pipe.pexpire(wake, expires)
            return
        with self.conn_or_acquire() as client:
            try:
                self._put_script(keys=self._script_keys([key, wake]), args=[body], client=client)
                if expires:
                    with client.pipeline() as pipe:
                        for p in self.priority_steps:
                            pipe.pexpire(self._q_for_pri(queue, p), expires)
                        pipe.pexpire(wake, expires)
                        pipe.execute()
            except kombu_redis.exceptions.TimeoutError:
                self.connection.mark_silent()
                raise

    # Queue removal takes its wake list along --------------------------------

    def _purge(self, queue: str) -> int:
        size = super()._purge(queue)
        with self.conn_or_acquire() as client:
            client.delete(self.wake_key(queue))
        return size

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        super()._delete(queue, *args, **kwargs)
        with self.conn_or_acquire(client=kwargs.get("client")) as client:
            client.delete(self.wake_key(queue))


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`'s atomic take.

    Also bounds how long a publish waits on a silent broker (a cut link, a
    frozen server: no error, no answer). kombu's retry policy reconnects
    after a timed-out command, and each attempt waits for the connect
    timeout again, so with offload's defaults (3 s socket timeout, two
    retries) a publish took 9.5 s to fail. Here, once a command or a connect
    has timed out, new channels fail at once for ``socket_timeout`` seconds:
    a publish fails in about one socket timeout, and a broker that answers
    again is used again as soon as that window ends.
    """

    Channel = Channel

    # kombu replaces the Transport when it reconnects; the kombu Connection
    # (``self.client``) stays, so the window is kept on it.
    _SILENT_UNTIL = "offload_redis_silent_until"

    #: The kombu Connection (None in kombu's class body, set in __init__).
    client: Any

    def mark_silent(self) -> None:
        """Note that the broker just let a command or a connect time out."""
        options = self.client.transport_options
        window = float(options.get("socket_timeout") or options.get("socket_connect_timeout") or 0)
        setattr(self.client, self._SILENT_UNTIL, monotonic() + window)

    def check_not_silent(self) -> None:
        """Raise a connection error if the broker timed out a moment ago."""
        left = getattr(self.client, self._SILENT_UNTIL, 0.0) - monotonic()
        if left > 0:
            raise kombu_redis.exceptions.ConnectionError(
                f"Redis timed out a moment ago; not waiting on it again for {left:.1f} s")

// A misbehaving JavaScript stage, for tests (tests/tests/sandbox.rs): the item's `do` says
// what to do to the host. Each must fail only its own item, with a clear error.

export function run(ctx, input) {
  const item = JSON.parse(input).item;
  switch (item.do) {
    case 'loop': // the CPU budget stops it
      for (;;) {}
    case 'bomb': { // the memory cap stops it (8 MiB a step, zeroed: little CPU per step)
      const keep = [];
      for (;;) keep.push(new Float64Array(1 << 20));
    }
    case 'throw': // not a stage-error: the component traps, the message in its stderr
      throw new Error('a plain error, not a stage-error');
    case 'recurse': // SpiderMonkey's own recursion limit
      return JSON.stringify(deep(100000));
    case 'fatal':
      throw { tag: 'fatal', val: 'refused on purpose' };
    default:
      return JSON.stringify({ ok: true });
  }
}

function deep(n) {
  return n === 0 ? [] : [deep(n - 1)];
}

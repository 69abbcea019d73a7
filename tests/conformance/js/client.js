// A second, independent OTLP client: the OpenTelemetry JS SDK exporting pathwatch-contract spans over
// OTLP/gRPC, or over OTLP/HTTP with the SDK's JSON exporter (@opentelemetry/exporter-trace-otlp-http:
// Content-Type application/json, the JS SDK's default for HTTP).
// Usage: node client.js <host:port> <scenario> [protocol]   (scenario: clean | bleed;
//        protocol: grpc (the default) | http/json, which posts to http://<host:port>/v1/traces)
// Prints one JSON line {"trace_ids": [...], "exports": N} once every export succeeded; exits 1 if an
// export failed. The SDK's own warnings (a partial success, an unreadable response) go to stderr.
'use strict';
const path = require('path');
const modules = path.resolve(process.env.OTEL_JS_MODULES || path.join(__dirname, 'node_modules'));
const req = (name) => require(path.join(modules, name));
const api = req('@opentelemetry/api');
const { NodeTracerProvider } = req('@opentelemetry/sdk-trace-node');
const { SimpleSpanProcessor } = req('@opentelemetry/sdk-trace-base');
const { resourceFromAttributes } = req('@opentelemetry/resources');

const [endpoint, scenario, protocol = 'grpc'] = process.argv.slice(2);
if (!endpoint || !['clean', 'bleed'].includes(scenario) || !['grpc', 'http/json'].includes(protocol)) {
  console.error('usage: node client.js HOST:PORT clean|bleed [grpc|http/json]');
  process.exit(2);
}
api.diag.setLogger(new api.DiagConsoleLogger(), api.DiagLogLevel.WARN);

function makeExporter() {
  if (protocol === 'http/json') {
    const { OTLPTraceExporter } = req('@opentelemetry/exporter-trace-otlp-http');
    return new OTLPTraceExporter({ url: `http://${endpoint}/v1/traces` });
  }
  const { OTLPTraceExporter } = req('@opentelemetry/exporter-trace-otlp-grpc');
  return new OTLPTraceExporter({ url: `http://${endpoint}` });
}

// every export's result, so that a failed one fails the client (the span processor only logs it)
const exporter = makeExporter();
const results = [];
const exportSpans = exporter.export.bind(exporter);
exporter.export = (spans, done) => exportSpans(spans, (result) => { results.push(result); done(result); });

const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({
    'service.name': 'js-conformance', 'service.version': '1.0.0', 'service.instance.id': 'js-1',
  }),
  spanProcessors: [new SimpleSpanProcessor(exporter)],
});
const tracer = provider.getTracer('pathwatch-conformance');

const ALICE = 'a11ce000000000000000000000000000';
const BOB = 'b0b00000000000000000000000000000';
const RUN = `js-run-${scenario}`;
const EVENTS = ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_completed'];

// Span times from one clock. Left to itself the SDK stamps a span's start with Date.now() (whole
// milliseconds) and its end with that start plus a performance.now() duration, so a child started
// in the last millisecond of its parent can seem to start after the parent ended, and the sidecar
// reports such a span as bleed.leaked_context (the clean run then failed now and then).
const wallAtStart = Date.now();
const perfAtStart = performance.now();
function now() {
  const ns = BigInt(Math.round((wallAtStart + performance.now() - perfAtStart) * 1e6));
  return [Number(ns / 1000000000n), Number(ns % 1000000000n)];  // an HrTime
}

function inSpan(name, attributes, parentCtx, body) {
  const span = tracer.startSpan(name, { attributes, startTime: now() }, parentCtx);
  const ctx = api.trace.setSpan(parentCtx, span);
  try { if (body) body(ctx); } finally { span.end(now()); }
  return span;
}

const common = { 'pathwatch.entry_point': '/ws', 'enduser.pseudo.id': ALICE };
const root = inSpan('websocket /ws', {
  'pathwatch.kind': 'request', 'http.route': '/ws', ...common, 'pathwatch.connection.id': 'js-conn-1',
}, api.context.active(), (rootCtx) => {
  inSpan('execution_engine.execute_agent', {
    ...common,
    'pathwatch.kind': 'execute', 'pathwatch.role': 'execution_engine',
    'code.function.name': 'demo.engines.UserExecutionEngine.execute_agent',
    'pathwatch.implementation': 'demo.engines.UserExecutionEngine',
    'pathwatch.canonical': true, 'pathwatch.retired': false, 'pathwatch.nested': false,
    'pathwatch.instance.id': 'js-inst-1', 'pathwatch.user_scoped': true,
    // the seeded bug: an instance built for Bob serves Alice's request
    'pathwatch.user.owner': scenario === 'bleed' ? BOB : ALICE,
    'pathwatch.run.id': RUN, 'thread.id': 1,
  }, rootCtx, (execCtx) => {
    EVENTS.forEach((type, i) => {
      const eventId = `${RUN}-${i}`;
      inSpan(`event_emitter.notify_${type}`, {
        ...common,
        'pathwatch.kind': 'emit', 'pathwatch.role': 'event_emitter',
        'code.function.name': `demo.emitters.Bridge.notify_${type}`,
        'pathwatch.implementation': 'demo.emitters.Bridge', 'pathwatch.canonical': true,
        'pathwatch.retired': false, 'pathwatch.nested': false, 'pathwatch.instance.id': 'js-inst-2',
        'pathwatch.user.target': ALICE, 'pathwatch.run.id': RUN, 'pathwatch.event.type': type,
        'messaging.operation.type': 'create', 'messaging.message.id': eventId,
      }, execCtx, (emitCtx) => {
        inSpan('websocket.send_json', {
          ...common,
          'pathwatch.kind': 'deliver', 'pathwatch.role': 'transport',
          'code.function.name': 'starlette.websockets.WebSocket.send_json',
          'pathwatch.implementation': 'starlette.websockets.WebSocket',
          'pathwatch.connection.id': 'js-conn-1', 'pathwatch.connection.user': ALICE,
          'pathwatch.delivery.outcome': 'written', 'pathwatch.delivery.link': 'context',
          'pathwatch.run.id': RUN, 'pathwatch.event.type': type,
          'messaging.operation.type': 'send', 'messaging.message.id': eventId,
        }, emitCtx);
      });
    });
  });
});

provider.forceFlush()
  .then(() => provider.shutdown())
  .then(() => {
    const failed = results.filter((result) => result.code !== 0);  // ExportResultCode.SUCCESS
    if (failed.length || !results.length) {
      throw new Error(failed.map((result) => String(result.error)).join('; ') || 'nothing exported');
    }
    console.log(JSON.stringify({ trace_ids: [root.spanContext().traceId], exports: results.length }));
  })
  .catch((err) => { console.error(`export failed: ${err}`); process.exit(1); });

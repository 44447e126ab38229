// Copies the microphone's samples (mono, the context's rate) to the page in blocks of ~50 ms.
class Recorder extends AudioWorkletProcessor {
  constructor() { super(); this.buffer = []; this.size = 0; }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      this.buffer.push(channel.slice());
      this.size += channel.length;
      if (this.size >= sampleRate / 20) {
        const block = new Float32Array(this.size);
        let at = 0;
        for (const part of this.buffer) { block.set(part, at); at += part.length; }
        this.port.postMessage(block, [block.buffer]);
        this.buffer = []; this.size = 0;
      }
    }
    return true;
  }
}
registerProcessor("recorder", Recorder);

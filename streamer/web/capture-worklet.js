// AudioWorklet processor: microphone frames -> mono signed 16-bit little-endian PCM chunks.
//
// The page runs its AudioContext at 16 kHz where the browser allows it (the browser resamples
// the microphone with a proper filter), so the chunks are usually 16 kHz mono s16le, the
// daemon's native format. Otherwise they are at the context's rate, which the page announces in
// its "start" message and the daemon resamples.
//
// Each message to the main thread: {pcm: ArrayBuffer (Int16 samples), peak: 0..1}.

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const ms = (options && options.processorOptions && options.processorOptions.chunkMs) || 100;
    this.size = Math.max(128, Math.round((sampleRate * ms) / 1000));
    this.buf = new Int16Array(this.size);
    this.n = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      const channels = input.length;
      const frames = input[0].length;
      for (let i = 0; i < frames; i++) {
        let s = 0;
        for (let c = 0; c < channels; c++) s += input[c][i];
        s /= channels;
        if (s > 1) s = 1;
        else if (s < -1) s = -1;
        const a = s < 0 ? -s : s;
        if (a > this.peak) this.peak = a;
        this.buf[this.n++] = s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
        if (this.n === this.size) this.emit();
      }
    }
    return true;
  }

  emit() {
    const out = this.buf.slice(0, this.n);
    this.port.postMessage({ pcm: out.buffer, peak: this.peak }, [out.buffer]);
    this.n = 0;
    this.peak = 0;
  }
}

registerProcessor("pcm-capture", PcmCapture);
